"""The image-contrast term as mllm_dpo computed it before it was read off DPO's own forwards: the pair
partner's image swapped into the chosen rows (``partner_pixels``) and four more forwards on those rows
(policy and reference, own and partner image). Kept as the reference the new term is tested against
(tests/test_dpo_batched_contrast.py) and timed against (bench/dpo_contrast.py), with the trainer and
batches both use."""
from __future__ import annotations

import torch

from unconfuse.train.losses import image_contrast_loss


def partner_pixels(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The image inputs of the first ``rows`` rows, each row's image swapped with its pair partner's
    (rows 2k and 2k+1 of a whole-pair batch). The two images of a pair must give the same number of
    image tokens (equal ``image_grid_thw`` / ``image_sizes`` where the count depends on them)."""
    partner = torch.arange(rows, device=inputs["input_ids"].device) ^ 1
    pixels = inputs["pixel_values"]
    if "image_grid_thw" in inputs:  # Qwen2-VL family: the patches of all images concatenated, per-image sizes
        grids = inputs["image_grid_thw"][:rows]
        if not torch.equal(grids, grids[partner]):
            raise ValueError("the image-contrast term needs the two images of a pair at one size (equal image_grid_thw); "
                             "mllm_dpo pads them onto one canvas for such models")
        chunks = torch.split(pixels[: int(grids.prod(-1).sum())], grids.prod(-1).tolist())
        return {"pixel_values": torch.cat([chunks[i] for i in partner.tolist()]), "image_grid_thw": grids[partner]}
    out = {"pixel_values": pixels[:rows][partner]}  # LLaVA-NeXT: (rows, tiles padded to the batch's most, C, H, W)
    if "image_sizes" in inputs:  # LLaVA-NeXT: tiles and image tokens follow the size; the model reads tiles by it
        sizes = inputs["image_sizes"][:rows]
        if not torch.equal(sizes, sizes[partner]):  # the model would scatter features into the wrong rows silently
            raise ValueError("the image-contrast term needs the two images of a pair at one size (equal image_sizes); "
                             "mllm_dpo pads them onto one canvas for such models")
        out["image_sizes"] = sizes[partner]
    return out


def _chosen_logps(model, inputs, rows: int, images: dict[str, torch.Tensor]) -> torch.Tensor:
    text_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
    kwargs = {k: inputs[k][:rows] for k in text_keys if k in inputs}
    completion = inputs["completion_mask"][:rows]
    labels = kwargs["input_ids"].masked_fill(completion == 0, -100)
    out = model(**kwargs, **images, labels=labels, use_cache=False, fused_lm_head=True)
    return out.log_probs[:, -(completion.shape[1] - 1):].sum(dim=1)


def separate_image_contrast(trainer, model, inputs) -> torch.Tensor:
    """The term on a [chosen; rejected] batch, from its own forwards (the reference: adapters disabled)."""
    from trl.trainer.utils import use_adapter

    rows = inputs["input_ids"].shape[0] // 2
    if rows % 2:
        raise ValueError("the image-contrast term needs whole pairs in every batch")
    own = {k: inputs[k][:rows] for k in ("pixel_values", "image_sizes") if k in inputs and "image_grid_thw" not in inputs}
    if "image_grid_thw" in inputs:
        grids = inputs["image_grid_thw"][:rows]
        own = {"pixel_values": inputs["pixel_values"][: int(grids.prod(-1).sum())], "image_grid_thw": grids}
    partner_images = partner_pixels(inputs, rows)
    policy_own = _chosen_logps(model, inputs, rows, own)
    policy_partner = _chosen_logps(model, inputs, rows, partner_images)
    with torch.no_grad(), use_adapter(trainer.accelerator.unwrap_model(model), adapter_name=None):
        ref_own = _chosen_logps(model, inputs, rows, own)
        ref_partner = _chosen_logps(model, inputs, rows, partner_images)
    return image_contrast_loss(policy_own, ref_own, policy_partner, ref_partner, trainer.beta)


def separate_loss(trainer, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The old PairDPOTrainer's loss in its two parts: TRL's plain DPO loss, and the separately computed term."""
    saved = trainer.image_contrast_weight
    trainer.image_contrast_weight = 0.0  # plain TRL DPO, no partner rows
    try:
        dpo = trainer.compute_loss(model, inputs)
    finally:
        trainer.image_contrast_weight = saved
    return dpo, separate_image_contrast(trainer, model, inputs)


def pair_examples(pairs: int, seed: int = 0) -> list[dict]:
    """Preference rows of ``pairs`` pairs (rows 2k, 2k+1) as mllm_dpo makes them: each pair's two images on
    one canvas, pairs of different sizes (so batches mix image-token counts, LLaVA-NeXT tile counts and
    Qwen2-VL grids), the two images of a pair wanting opposite letters."""
    from unconfuse.recipes.mllm_dpo import same_canvas

    from .twin_inputs import blocky_image

    sizes = [((112, 84), (100, 60)), ((64, 96), (40, 80)), ((96, 96), (80, 64))]
    rows = []
    for k in range(pairs):
        first, second = sizes[k % len(sizes)]
        images = same_canvas(blocky_image(*first, seed + 2 * k), blocky_image(*second, seed + 2 * k + 1))
        for image, (chosen, rejected) in zip(images, (("A", "B"), ("B", "A"))):
            rows.append({"images": [image],
                         "prompt": [{"role": "user", "content": "Which side is the lesion on? A: left B: right"}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def pair_trainer(backend, out_dir, weight: float, pairs_per_batch: int = 2, beta: float = 0.1, lora_scale: float = 0.5,
                 device: str = "cpu", bf16: bool = False):
    """mllm_dpo's PairDPOTrainer on ``backend``'s model with LoRA (no dropout, so forwards repeat exactly)
    whose B matrices are random (``lora_scale``), so the policy differs from the reference."""
    from datasets import Dataset
    from trl import DPOConfig

    from unconfuse.recipes.mllm_dpo import PairDPOTrainer
    from unconfuse.train.mllm import MllmLora, attach_lora, with_eval_bos

    model = attach_lora(backend, MllmLora(r=4, alpha=8, dropout=0.0), seed=0)
    args = DPOConfig(output_dir=str(out_dir), max_length=None, beta=beta, report_to=[], use_cpu=device == "cpu",
                     per_device_train_batch_size=2 * pairs_per_batch, bf16=bf16, disable_tqdm=True,
                     activation_checkpointing=False)  # mllm_dpo's default (TRL's is on)
    trainer = PairDPOTrainer(model=model, args=args, processing_class=with_eval_bos(backend.processor),
                                   train_dataset=Dataset.from_list(pair_examples(pairs_per_batch)),
                                   pairs_per_batch=pairs_per_batch, image_contrast_weight=weight)
    # after TRL copied the fresh (zero) backend to its "ref" backend: the reference stays the base model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.default" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * lora_scale)
    return trainer


def collate(trainer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """A [chosen; rejected] batch of ``rows`` as TRL's collator makes it, on the trainer's device."""
    import copy

    return trainer._prepare_inputs(trainer.data_collator(copy.deepcopy(rows)))  # the collator edits its rows
