"""mllm_dpo's image-contrast term read off DPO's own forwards: the same loss and gradients as the separate
forwards it replaced (tests/dpo_reference.py), and no more forwards or rows than plain DPO, on tiny twins
of each image layout."""
import math

import pytest
import torch

from bench.dpo_reference import collate, pair_examples, pair_trainer, partner_pixels, separate_loss
from unconfuse.eval.models import load_model
from unconfuse.recipes import mllm_dpo

PAIRS = 2  # rows: [2 pairs' chosen; their rejected] = 8


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def forward_rows(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The rows of each forward, as the token embedding sees them."""
    rows: list[int] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    return rows, handle


def row_images(inputs, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image inputs of the batch rows ``index``, laid out as the processor lays out a batch of them."""
    if "image_grid_thw" in inputs:  # Qwen2-VL family: per-image patch chunks
        grids = inputs["image_grid_thw"]
        chunks = torch.split(inputs["pixel_values"], grids.prod(-1).tolist())
        return {"pixel_values": torch.cat([chunks[i] for i in index.tolist()]), "image_grid_thw": grids[index]}
    return {k: inputs[k][index] for k in ("pixel_values", "image_sizes") if k in inputs}


@pytest.mark.parametrize("model_name", ["tiny-llava", "tiny-qwen2.5-vl", "tiny-llava-next", "tiny-gemma3"])
def test_batched_term_equals_separate_forwards(model_name, tmp_path):
    """LLaVA (pixel rows), Qwen2.5-VL (patch chunks + image_grid_thw), LLaVA-NeXT (tiles + image_sizes),
    Gemma 3 (token_type_ids); pairs of two sizes in the batch. Loss, term, DPO metrics and gradients match."""
    backend, _ = load_model(model_name, device="cpu")
    trainer = pair_trainer(backend, tmp_path, weight=1.0, pairs_per_batch=PAIRS, beta=1.0)
    model = trainer.model
    batch = collate(trainer, pair_examples(PAIRS))

    # the partner rows the term reads hold the partner image inputs exactly as the old swap built them
    rows = 2 * PAIRS
    partner = mllm_dpo.partner_rows(batch, rows)
    assert partner.tolist() == [rows + (i ^ 1) for i in range(rows)]  # the partner's rejected rows
    swapped = partner_pixels(batch, rows)
    assert swapped.keys() == row_images(batch, partner).keys()
    for key, value in row_images(batch, partner).items():
        assert torch.equal(value, swapped[key]), key
    for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in batch:
            assert torch.equal(batch[key][partner], batch[key][:rows]), key

    forwards, handle = forward_rows(model)
    batched = trainer.compute_loss(model, batch)
    batched.backward()
    handle.remove()
    assert forwards == [4 * PAIRS, 4 * PAIRS]  # plain DPO's policy and reference forwards, nothing added
    batched_grads = lora_grads(model)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    dpo, term = separate_loss(trainer, model, batch)
    separate = dpo + trainer.image_contrast_weight * term
    separate.backward()
    separate_grads = lora_grads(model)
    term = term.item()

    assert batched.item() == pytest.approx(separate.item(), abs=1e-5)
    assert metrics["image_contrast"] == pytest.approx(term, abs=1e-5)
    assert abs(term - math.log(2)) > 1e-3  # the policy differs from the reference: a real test of the rows
    plain = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "image_contrast"}  # separate_loss's DPO
    for key in ("entropy", "logps/chosen", "logps/rejected", "rewards/margins", "logits/chosen"):
        assert metrics[key] == pytest.approx(plain[key], abs=1e-5), key
    assert batched_grads.keys() == separate_grads.keys() and batched_grads
    # float32 sums in another order: compare each parameter's gradient as a whole, not element by element
    errors = {name: ((grad - separate_grads[name]).norm() / separate_grads[name].norm()).item()
              for name, grad in batched_grads.items()}
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda item: item[1])


def test_weight_zero_is_plain_dpo(tmp_path, monkeypatch):
    backend, _ = load_model("tiny-llava", device="cpu")
    trainer = pair_trainer(backend, tmp_path, weight=0.0, pairs_per_batch=PAIRS)
    monkeypatch.setattr(mllm_dpo, "partner_rows", None)  # never reached
    forwards, handle = forward_rows(trainer.model)
    trainer.compute_loss(trainer.model, collate(trainer, pair_examples(PAIRS)))
    handle.remove()
    assert forwards == [4 * PAIRS, 4 * PAIRS] and "image_contrast" not in trainer._metrics["train"]


def test_the_term_reads_the_partner_image_rows(tmp_path, monkeypatch):
    """The comparison can fail: read off the wrong rows, the term moves far from the separate forwards'.
    The chosen rows themselves (own image as "partner") cancel to exactly log 2; the partner's chosen rows
    (partner image, but the partner's answer) give another value."""
    backend, _ = load_model("tiny-llava", device="cpu")
    trainer = pair_trainer(backend, tmp_path, weight=1.0, pairs_per_batch=PAIRS, beta=1.0)
    batch = collate(trainer, pair_examples(PAIRS))
    rows = 2 * PAIRS
    with torch.no_grad():
        separate = sum(separate_loss(trainer, trainer.model, batch)).item()
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(separate, abs=1e-5)
        wrong = {"own rows": torch.arange(rows), "partner's chosen rows": torch.arange(rows) ^ 1}
        for name, index in wrong.items():
            monkeypatch.setattr(mllm_dpo, "partner_rows", lambda inputs, n, pair_rows=None, index=index: index)
            loss = trainer.compute_loss(trainer.model, batch).item()
            assert abs(loss - separate) > 1e-3, name
    assert trainer._metrics["train"]["image_contrast"][-2] == pytest.approx(math.log(2), abs=1e-6)


def test_partner_rows_refuses_pairs_that_do_not_match():
    """Rows of a pair that differ in their text (another prompt, or another image-token count) have no twin."""
    ids = torch.tensor([[1, 5, 5, 7], [1, 5, 5, 8], [1, 5, 5, 8], [1, 5, 5, 7]])  # chosen 0, 1; rejected 2, 3
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.zeros_like(ids)}
    assert mllm_dpo.partner_rows(inputs, 2).tolist() == [3, 2]
    inputs["input_ids"] = torch.tensor([[1, 5, 5, 7], [1, 6, 5, 8], [1, 5, 5, 8], [1, 6, 5, 7]])
    with pytest.raises(ValueError, match="share the prompt"):
        mllm_dpo.partner_rows(inputs, 2)
