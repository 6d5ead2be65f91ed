"""Backends on tiny models built from config: the efficient paths must equal the plain ones."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from unconfuse.eval.models import ModelLoadError, Query, list_presets, load_model, load_preset, resolve_model, _preset_dir


def _images(n, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-gemma3"])
def vlm(request):
    backend, _ = load_model(request.param, device="cpu")
    return backend


def _queries():
    imgs = _images(3)
    return [Query("im0", imgs[0], "What imaging modality is shown?", ("Computed tomography", "MRI")),
            Query("im1", imgs[1], "What imaging modality is shown?", ("Computed tomography", "MRI")),
            Query("im0", imgs[0], "Which side is the lesion on?", ("left", "right upper lobe"))]


def _full_forward_logprobs(backend, query, ids):
    """The reference way: one full forward of prompt + continuation with the pixels, per option."""
    inputs = backend._inputs([query])
    full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros(1, len(ids), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = backend.model(input_ids=full, attention_mask=torch.ones_like(full), **extra).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    start = inputs["input_ids"].shape[1]
    return torch.stack([logprobs[start - 1 + t, tok] for t, tok in enumerate(ids)]).mean().item()


def test_prefix_scores_from_the_shared_cache_equal_full_forwards(vlm):
    queries = _queries()
    vlm.clear_cache()
    vlm.image_encoder_calls = 0
    scores = vlm.continuation_scores(queries, [q.options for q in queries])
    assert vlm.image_encoder_calls == 2  # three questions, two unique images
    for q, row in zip(queries, scores):
        ids = vlm.continuation_ids([q], [q.options])[0]
        expected = [_full_forward_logprobs(vlm, q, option_ids) for option_ids in ids]
        assert row == pytest.approx(expected, abs=1e-4)


def test_greedy_with_cached_features_equals_the_pixel_path(vlm):
    queries = _queries()
    vlm.clear_cache()
    cached = vlm.next_token_scores(queries)
    a_id, b_id = vlm.letter_token_ids(("A", "B"), queries[0])
    for q, row in zip(queries, cached):
        inputs = vlm._inputs([q])
        with torch.no_grad():
            logits = vlm.model(**inputs).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        assert row == pytest.approx([lp[a_id].item(), lp[b_id].item()], abs=1e-4)


def test_batched_generation_equals_one_by_one(vlm):
    queries = _queries()
    vlm.clear_cache()
    batched = vlm.generate(queries, max_new_tokens=6)
    single = [vlm.generate([q], max_new_tokens=6)[0] for q in queries]
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_letter_tokens_are_the_replies_first_tokens(vlm):
    query = _queries()[0]
    a, b = vlm.letter_token_ids(("A", "B"), query)
    assert a != b and vlm.tokenizer.decode([a]).strip() == "A"
    rendered = vlm.render(query.prompt)
    full = vlm.tokenizer.encode(rendered + vlm.reply_text(query.prompt, rendered, "A"), add_special_tokens=False)
    assert full[len(vlm.tokenizer.encode(rendered, add_special_tokens=False))] == a


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-hf-clip"])
def test_clip_similarities_are_cosines_and_images_encode_once(preset):
    backend, spec = load_model(preset, device="cpu")
    assert spec.family in ("open-clip", "hf-clip")
    imgs = _images(2)
    queries = [Query("a", imgs[0], "q"), Query("b", imgs[1], "q"), Query("a", imgs[0], "q2")]
    texts = [("chest x-ray", "brain mri"), ("chest x-ray", "brain mri"), ("left", "right")]
    sims = backend.similarities(queries, texts)
    assert backend.image_encoder_calls == 2
    img = torch.nn.functional.normalize(backend._encode_images([imgs[0]]).float(), dim=-1)
    txt = torch.nn.functional.normalize(backend._encode_texts(["left", "right"]).float(), dim=-1)
    assert sims[2] == pytest.approx((img @ txt.T)[0].tolist(), abs=1e-5)
    assert all(-1 <= s <= 1 for row in sims for s in row)


def test_every_preset_parses():
    names = list_presets()
    for required in ("tiny-llava", "tiny-qwen2-vl", "tiny-clip", "tiny-hf-clip", "biomedclip", "pmc-clip",
                     "clip-vit-b-16", "llava-1.5-7b", "llava-v1.6-mistral-7b", "llava-med-v1.5", "qwen2.5-vl-7b",
                     "medgemma-4b"):
        assert required in names
    for name in names:
        spec = load_preset(_preset_dir() / f"{name}.yaml")
        assert spec.trust_remote_code is False
        assert (_preset_dir() / f"{name}.yaml").read_text().startswith("#")


def test_a_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(ModelLoadError) as err:
        load_model("llava-1.5-7b")
    assert time.time() - start < 5
    assert "llava-hf/llava-1.5-7b-hf" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_model("some-org/some-model")
    start = time.time()
    with pytest.raises(ModelLoadError, match="biomedclip.*HF_HUB_OFFLINE"):
        load_model("biomedclip")
    assert time.time() - start < 15
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve_model("no-such-preset")


def test_local_folders_resolve_to_their_family(unconfuse_home):
    load_model("tiny-hf-clip")
    load_model("tiny-clip")
    folders = {p.name.split("-")[0] + "-" + p.name.split("-")[1]: p for p in (unconfuse_home / "models").iterdir()
               if not p.name.startswith(".")}
    assert resolve_model(str(folders["tiny-hf"])).family == "hf-clip"
    assert resolve_model(str(folders["tiny-clip"])).family == "open-clip"


def test_each_image_prefix_runs_once_per_pass(vlm):
    """Three questions over two images: the language model sees two heads, then three tails."""
    rows_seen = []
    embed = vlm.model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda mod, args, out: rows_seen.append(tuple(args[0].shape)))
    try:
        vlm.clear_cache()
        vlm.next_token_scores(_queries())
    finally:
        handle.remove()
    assert [shape[0] for shape in rows_seen] == [2, 3]
