"""Tiny twins of the real MLLM families (random weights, built offline with the real transformers model
and processor classes and chat templates): eval's batched, cached, prefix-sharing backend must give what a
naive forward of one prompt and one image gives, images must matter, and prompts carry one BOS."""
import numpy as np
import pytest
import torch

from bench.twin_inputs import question_rows
from unconfuse.eval.models import Query, load_model
from unconfuse.eval.prompts import load_prompts

TWINS = ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-gemma3", "tiny-llava-next", "tiny-llava-med"]
TOL = 1e-4  # parity (measured: <= 1e-6 on CPU float32)
TEETH = 1e-3  # what swapping the image must move
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module", params=TWINS)
def twin(request):
    from unconfuse.eval.world import prepare

    prepare(models=[request.param])
    backend, spec = load_model(request.param, device="cpu")
    assert spec.family == "hf-vlm"
    return backend


@pytest.fixture()
def fast(twin):
    """The twin on the path eval chooses for it."""
    twin.plain_path = not twin.can_cache_features
    twin.clear_cache()
    return twin


def _queries(swap=False):
    """As eval's runner builds them: two images of different sizes and aspect ratios, two questions on one."""
    prompts = load_prompts()
    return [Query(key, image, prompts.render("greedy", question, options), options, {"pair_id": f"p{i}", "image": 1})
            for i, (key, image, question, options) in enumerate(question_rows(swap))]


def _messages(query, reply=None):
    messages = [{"role": "user", "content": [{"type": "image", "image": query.image},
                                             {"type": "text", "text": query.prompt}]}]
    if reply is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return messages


def _naive_inputs(backend, query):
    """One prompt and one image through the processor's own chat-template tokenization."""
    return backend.processor.apply_chat_template(_messages(query), add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")


@torch.no_grad()
def _naive_logprobs(backend, query, continuation=()):
    """Log-probabilities after the prompt (row 0) and after each continuation prefix: one full forward."""
    inputs = dict(_naive_inputs(backend, query))
    n = inputs["input_ids"].shape[1]
    if continuation:
        extra = torch.tensor([list(continuation)])
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                fill = extra if key == "input_ids" else (torch.ones_like(extra) if key == "attention_mask"
                                                         else torch.zeros_like(extra))
                inputs[key] = torch.cat([inputs[key], fill], dim=1)
    logits = backend.model(**inputs).logits[0, n - 1:]
    return torch.log_softmax(logits.float(), -1)


@pytest.fixture(scope="module")
@torch.no_grad()
def naive(twin):
    """The reference answers, one query at a time: the processor on one prompt and one image, one full
    forward (log-softmax) per score, ``model.generate`` per query."""
    queries = _queries()
    letters = twin.letter_token_ids(("A", "B"), queries[0])
    options = [q.options for q in queries]
    cont_ids = twin.continuation_ids(queries, options)
    ref = {"next": [], "prefix": [], "generate": []}
    for q, ids_rows in zip(queries, cont_ids):
        inputs = _naive_inputs(twin, q)
        prompt_ids = inputs["input_ids"][0].tolist()
        ref["next"].append([_naive_logprobs(twin, q)[0][t].item() for t in letters])
        row = []
        for option, ids in zip(q.options, ids_rows):
            # the continuation's tokens are those the chat template gives the reply
            full = twin.processor.apply_chat_template(_messages(q, option), tokenize=True, return_dict=True,
                                                      return_tensors="pt")["input_ids"][0].tolist()
            assert full[:len(prompt_ids)] == prompt_ids and full[len(prompt_ids):len(prompt_ids) + len(ids)] == ids
            row.append(_naive_logprobs(twin, q, ids)[torch.arange(len(ids)), ids].mean().item())
        ref["prefix"].append(row)
        out = twin.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=twin.tokenizer.pad_token_id)
        ref["generate"].append(twin.tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True))
    return ref


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_eval_equals_a_naive_forward_per_query(twin, naive, path):
    if path == "fast" and not twin.can_cache_features:
        pytest.skip("no mm_encoder_outputs: the plain path is the only one")
    twin.plain_path = path == "plain"
    twin.clear_cache()
    twin.image_encoder_calls = 0
    queries = _queries()
    scores = twin.next_token_scores(queries, ("A", "B"))
    assert twin.image_encoder_calls == (2 if path == "fast" else 3)  # fast: three questions, two images
    for row, expected in zip(scores, naive["next"]):
        assert row == pytest.approx(expected, abs=TOL)
    for row, expected in zip(twin.continuation_scores(queries, [q.options for q in queries]), naive["prefix"]):
        assert row == pytest.approx(expected, abs=TOL)
    assert twin.generate(queries, MAX_NEW_TOKENS) == naive["generate"]


def test_swapping_the_image_moves_the_scores(fast):
    before = np.array(fast.next_token_scores(_queries(), ("A", "B")))
    fast.clear_cache()
    after = np.array(fast.next_token_scores(_queries(swap=True), ("A", "B")))
    assert np.abs(before - after).max() > TEETH


def test_prompts_wider_than_the_sliding_window_take_the_plain_path(fast, monkeypatch):
    """Windows count padded columns, so the shared-prefix layout (rows with holes) is only exact while
    it fits the window; beyond it, the plain path gives the naive numbers."""
    if fast.sliding_window is None:
        pytest.skip("no sliding-window attention")
    monkeypatch.setattr(fast.model.config.get_text_config(), "sliding_window", 24)
    queries = _queries()
    assert fast.prefill(queries) is None
    fast.image_encoder_calls = 0
    scores = fast.next_token_scores(queries, ("A", "B"))
    assert fast.image_encoder_calls == 3
    letters = fast.letter_token_ids(("A", "B"), queries[0])
    for q, row in zip(queries, scores):
        lp = _naive_logprobs(fast, q)[0]
        assert row == pytest.approx([lp[t].item() for t in letters], abs=TOL)


def test_an_eval_prompt_carries_one_bos(twin):
    bos = twin.tokenizer.bos_token_id
    if bos is None:
        pytest.skip("this family's tokenizer has no BOS")
    inputs = twin._inputs(_queries())
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"].bool()):
        real = ids[mask].tolist()
        assert real[0] == bos and real.count(bos) == 1
    assert _naive_inputs(twin, _queries()[0])["input_ids"][0].tolist().count(bos) == 1


# TRL's verbatim copies (llava_next: llava-hf/llava-v1.6-mistral-7b-hf's [INST] template)
REAL_TEMPLATES = {"tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-gemma3": "gemma3", "tiny-llava-next": "llava_next"}


def test_the_chat_template_renders_as_the_real_one(twin):
    """The twins ship TRL's training variant (the real text plus {% generation %} markers for
    assistant-only loss): every conversation eval and training render comes out as the real one's."""
    name = next((n for n in REAL_TEMPLATES if twin.name == n), None)
    if name is None:
        pytest.skip("this twin has its own tiny template")
    from importlib.resources import files

    real = (files("trl") / "chat_templates" / f"{REAL_TEMPLATES[name]}.jinja").read_text(encoding="utf-8")
    assert "{% generation %}" in twin.processor.chat_template or "{%- generation -%}" in twin.processor.chat_template
    system = [{"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]}]
    for messages in (_messages(_queries()[0]), _messages(_queries()[0], "B"), system + _messages(_queries()[0], "A: left")):
        for generation_prompt in (True, False):
            ours = twin.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            theirs = twin.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                                        chat_template=real)
            assert ours == theirs
