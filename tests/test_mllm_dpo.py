"""mllm_dpo: the image-contrast term inside TRL's DPOTrainer, on tiny models."""
import json
import math
from pathlib import Path

import pytest
import torch

from bench.dpo_reference import partner_pixels  # the old way's image swap, the reference of the batched term
from unconfuse.recipes import mllm_dpo
from unconfuse.recipes.mllm_dpo import MllmDpoConfig, PreferenceSettings
from unconfuse.train.config import TrainSettings
from unconfuse.train.mllm import MllmData


def config(world, out, model, weight):
    return MllmDpoConfig(
        model=model, output_dir=str(out), report_to="none", val_mode="greedy", test_modes=["greedy"],
        preference=PreferenceSettings(beta=0.1, image_contrast_weight=weight),
        data=MllmData(train=str(world.root / "train"), val=str(world.root / "val"), test=str(world.root / "test")),
        train=TrainSettings(max_steps=2, pairs_per_batch=2, learning_rate=1e-3, warmup_steps=0, eval_steps=2,
                          save_steps=2, logging_steps=1))


def test_partner_pixels_swap_whole_images_of_each_pair():
    rows = torch.arange(8, dtype=torch.float).view(8, 1, 1, 1).expand(8, 3, 2, 2)  # chosen rows 0-3, rejected 4-7
    out = partner_pixels({"input_ids": torch.zeros(8, 5), "pixel_values": rows}, 4)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1, 0, 3, 2]
    # Qwen2-VL: the patches of all images concatenated; pairs may differ in size, the two images of a pair may not
    grid = torch.tensor([[1, 2, 2]] * 2 + [[1, 2, 4]] * 2 + [[1, 2, 2]] * 2 + [[1, 2, 4]] * 2)
    sizes = grid.prod(-1).tolist()
    patches = torch.cat([torch.full((n, 6), float(i)) for i, n in enumerate(sizes)])
    out = partner_pixels({"input_ids": torch.zeros(8, 5), "pixel_values": patches, "image_grid_thw": grid}, 4)
    assert out["pixel_values"][:, 0].tolist() == [1.0] * 4 + [0.0] * 4 + [3.0] * 8 + [2.0] * 8
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2], [1, 2, 4], [1, 2, 4]]
    with pytest.raises(ValueError, match="two images of a pair at one size"):
        partner_pixels({"input_ids": torch.zeros(8, 5), "pixel_values": patches,
                        "image_grid_thw": torch.tensor([[1, 2, 2]] * 3 + [[1, 2, 4]] * 5)}, 4)


def test_same_canvas_pads_without_scaling():
    from PIL import Image

    wide, tall = Image.new("RGB", (90, 40), (255, 255, 255)), Image.new("RGB", (30, 70), (255, 255, 255))
    a, b = mllm_dpo.same_canvas(wide, tall)
    assert a.size == b.size == (90, 70)
    assert a.getbbox() == (0, 15, 90, 55) and b.getbbox() == (30, 0, 60, 70)  # content centred, unscaled


@pytest.mark.parametrize("model,varies", [("tiny-llava", False), ("tiny-gemma3", False), ("tiny-qwen2-vl", True),
                                          ("tiny-qwen2.5-vl", True)])
def test_image_tokens_vary_with_size_only_for_dynamic_resolution(model, varies):
    from unconfuse.eval.models import load_model

    backend, _ = load_model(model, device="cpu")
    assert mllm_dpo.image_tokens_vary(backend.processor) is varies


@pytest.mark.slow
def test_image_contrast_on_images_of_different_sizes(world, sample_bench, tmp_path):
    """Qwen2.5-VL (dynamic resolution) on real images of varied sizes: each pair is put on one canvas, so the
    partner swap fits the prompt's image tokens; batches mix pairs of different sizes."""
    from unconfuse.eval.benchmarks import load_benchmark
    from unconfuse.eval.prompts import load_prompts

    cfg = config(world, tmp_path / "run", "tiny-qwen2.5-vl", 1.0)
    cfg.data.train = str(sample_bench)
    examples = mllm_dpo.preference_examples(load_benchmark(str(sample_bench)), load_prompts(), cfg.data, 0,
                                            same_size_pairs=True)
    sizes = [ex["images"][0].size for ex in examples]
    assert sizes[0::2] == sizes[1::2] and len(set(sizes)) > 1
    results = mllm_dpo.main(cfg)
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    first = next(h for h in state["log_history"] if "loss" in h)
    assert results.steps == 2 and first["image_contrast"] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("model", ["tiny-llava", pytest.param("tiny-qwen2-vl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_first_step_loss_is_log2_per_term(world, tmp_path, model, weight):
    """At step 1 the adapters are zero, so policy == reference: every preference term is -log sigmoid(0) = log 2."""
    results = mllm_dpo.main(config(world, tmp_path / "run", model, weight))
    assert results.strategy == ("dpo+image-contrast" if weight else "dpo") and results.steps == 2
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    first = next(h for h in state["log_history"] if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2) * (1 + weight), abs=1e-4)
    if weight:
        assert first["image_contrast"] == pytest.approx(math.log(2), abs=1e-4)
    assert (Path(tmp_path / "run" / "checkpoints" / "best" / "adapter_config.json")).exists()


def test_sft_weight_adds_its_share_of_the_chosen_answers_nll(world, tmp_path):
    """TRL's ``["sigmoid", "sft"]`` loss at step 1 (policy == reference, DPO term log 2): log 2 + w x the chosen
    answers' mean token NLL, the same NLL at every weight (so weights 1 and 0.5 add it in the ratio 2:1)."""
    added = {}
    for weight in (1.0, 0.5):
        cfg = config(world, tmp_path / f"run-{weight}", "tiny-llava", 0.0)
        cfg.preference.sft_weight = weight
        mllm_dpo.main(cfg)
        state = json.loads((tmp_path / f"run-{weight}" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
        added[weight] = next(h for h in state["log_history"] if "loss" in h)["loss"] - math.log(2)
    assert added[1.0] > 0.1  # the untrained letter's NLL
    assert added[1.0] == pytest.approx(2 * added[0.5], rel=1e-3)


def test_llava_next_partner_swap_gives_the_logits_of_the_swapped_images():
    """LLaVA-NeXT (anyres): pixel_values are (rows, tiles, C, H, W), tiles padded to the batch's most, and each
    row's image_sizes say how many tiles are real and how many image tokens the prompt has. Pairs of different
    sizes (5 and 3 tiles), each pair on one canvas: the partner swap (pixels and image_sizes) gives exactly what
    the prompts processed with the swapped images give. A pair of two sizes is refused: its image-token counts
    differ, and the model would scatter features into the wrong rows without an error."""
    import numpy as np
    from PIL import Image

    from unconfuse.eval.models import load_model

    backend, _ = load_model("tiny-llava-next", device="cpu")
    assert mllm_dpo.image_tokens_vary(backend.processor)  # so mllm_dpo puts each pair on one canvas
    rng = np.random.default_rng(0)

    def image(width, height):
        return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))

    pairs = [mllm_dpo.same_canvas(image(112, 84), image(100, 60)), mllm_dpo.same_canvas(image(64, 96), image(40, 80))]
    images = [im for pair in pairs for im in pair]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which side is the lesion on?"}]}]
    text = backend.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def batch(batch_images):
        return backend.processor(text=[text] * len(batch_images), images=[[im] for im in batch_images],
                                 return_tensors="pt", padding=True)

    inputs, expected = batch(images), batch([images[i ^ 1] for i in range(4)])
    assert inputs["image_sizes"].tolist() == [[84, 112]] * 2 + [[96, 64]] * 2 and inputs["pixel_values"].shape[1] == 5
    tokens = (inputs["input_ids"] == backend.image_token_id).sum(-1).tolist()
    assert tokens == [70, 70, 46, 46] and torch.equal(inputs["input_ids"], expected["input_ids"])
    partner = partner_pixels(inputs, 4)
    text_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        swapped = backend.model(**text_inputs, **partner).logits
        reference = backend.model(**expected).logits
        own = backend.model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (swapped - reference)[real].abs().max() < 1e-5
    assert (swapped - own)[real].abs().max() > 1e-3  # the swap changed what each row sees
    with pytest.raises(ValueError, match="two images of a pair at one size"):
        partner_pixels(batch([image(112, 84), image(64, 96)] * 2), 4)
