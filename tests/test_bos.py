"""One BOS everywhere: the prompt tokens TRL's collators build for training equal the tokens eval scores,
on every MLLM twin (TRL tokenizes rendered chats without special tokens; templates that write no BOS
would otherwise train without it)."""
import numpy as np
import pytest
from PIL import Image

from unconfuse.eval.models import Query, load_model
from unconfuse.eval.prompts import load_prompts
from unconfuse.train.mllm import with_eval_bos

from .test_twins import TWINS


@pytest.fixture(scope="module", params=TWINS)
def twin(request):
    from unconfuse.eval.world import prepare

    prepare(models=[request.param])
    return load_model(request.param, device="cpu")[0]


def _example():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    prompt = load_prompts().render("greedy", "Which side is the lesion on?", ("left", "right"))
    return image, prompt


def _unpadded(batch, row=0):
    return batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()


def _bos_count(backend, ids):
    bos = backend.tokenizer.bos_token_id
    return ids.count(bos) if bos is not None else None


def test_training_prompts_are_the_eval_prompts_with_one_bos(twin):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    image, prompt = _example()
    evaluated = _unpadded(twin._inputs([Query("x", image, prompt, ("left", "right"), {})]))
    processor = with_eval_bos(twin.processor)
    preference = DataCollatorForVisionPreference(processor)(
        [{"images": [image], "prompt": [{"role": "user", "content": prompt}],
          "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]}])
    dpo_prompt = [t for t, done in zip(_unpadded(preference), preference["completion_mask"][0].tolist()) if not done]
    sft = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(
        [{"images": [image], "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A"}]}])
    sft_row = _unpadded(sft)
    assert dpo_prompt == evaluated
    assert sft_row[:len(evaluated)] == evaluated
    if twin.tokenizer.bos_token_id is not None:
        assert _bos_count(twin, evaluated) == _bos_count(twin, sft_row) == 1 and evaluated[0] == twin.tokenizer.bos_token_id


def test_the_adapters_processor_is_left_as_it_is(twin):
    """Only TRL's copy adds BOS: the eval processor (saved with checkpoints) keeps its class and behaviour."""
    image, prompt = _example()
    processor = with_eval_bos(twin.processor)
    assert type(processor).__name__ == type(twin.processor).__name__
    text = twin.render(prompt)
    plain = twin.processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    trained = processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    bos = twin.tokenizer.bos_token
    if bos and not text.startswith(bos):  # a template that writes no BOS: TRL's copy adds it, the original does not
        assert len(trained) == len(plain) + 1 and trained[0] == twin.tokenizer.bos_token_id
    else:
        assert trained.tolist() == plain.tolist()
