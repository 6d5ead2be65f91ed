"""mllm_dpo: preference tuning of an MLLM on confusing pairs, with the pair image-contrast term.

For each image: chosen = its correct option's letter, rejected = the other letter (TRL DPOTrainer,
LoRA; the reference model is the base, reached by disabling the adapters). Plain DPO shares one
image between chosen and rejected, so it can be satisfied by text priors alone. Confusing pairs
give the missing conditional preference for free (mDPO): the same prompt and the same correct
answer should be likelier with the image it belongs to than with the pair-partner image, which
needs the opposite answer. ``image_contrast_weight: 0`` is plain DPO, the baseline.

    unconfuse train mllm_dpo --config configs/mllm_dpo/tiny.yaml [key=value ...]

Skeleton: setup -> base test scores -> train (DPOTrainer + image-contrast term, validation
callback) -> final test scores with the selected adapters -> save. Shares its data and LoRA
settings with mllm_sft.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from unconfuse.eval.pairs import Benchmark
from unconfuse.train.config import to_dict
from unconfuse.train.losses import image_contrast_loss
from unconfuse.train.run import recipe_cli
from unconfuse.train.mllm import DataConfig, LoraSettings, MllmRun, PairBatches, TrainConfig, letter_examples, summary

RECIPE = "mllm_dpo"


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    image_contrast_weight: float = 1.0  # 0 = plain DPO
    sft_weight: float = 0.0  # RPO-style NLL on the chosen answer (TRL's "sft" loss term)


@dataclass
class MllmDpoConfig:
    """Every field can be set in YAML or as ``key=value`` on the command line."""

    model: str = "tiny-llava-base"
    strategy: str | None = None  # default: dpo+image-contrast, or dpo when the weight is 0
    output_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_mode: str = "greedy"
    test_modes: list[str] = field(default_factory=lambda: ["greedy", "prefix", "mc"])
    report_to: str = "wandb"
    allow_leakage: bool = False
    resume_from_checkpoint: str | None = None
    val_batch_pairs: int = 8


def preference_examples(bench: Benchmark, prompts, cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """Two preference examples per pair (rows 2k, 2k+1): chosen = the correct letter, rejected = the other."""
    return [{"images": [ex["image"]], "prompt": [{"role": "user", "content": ex["prompt"]}],
             "chosen": [{"role": "assistant", "content": ex["correct"]}],
             "rejected": [{"role": "assistant", "content": ex["other"]}]}
            for ex in letter_examples(bench, prompts, cfg, seed)]


def partner_pixels(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The image inputs of the first ``rows`` rows, each row's image swapped with its pair partner's
    (rows 2k and 2k+1 of a whole-pair batch)."""
    partner = torch.arange(rows, device=inputs["input_ids"].device) ^ 1
    pixels = inputs["pixel_values"]
    if "image_grid_thw" in inputs:  # Qwen2-VL: patches of all images concatenated; equal grids only
        grids = inputs["image_grid_thw"][:rows]
        if not bool((grids == grids[0]).all()):
            raise ValueError("the image-contrast term needs images of one size in a batch (equal image_grid_thw)")
        per_image = pixels.view(-1, int(grids[0].prod()), pixels.shape[-1])[:rows]
        return {"pixel_values": per_image[partner].reshape(-1, pixels.shape[-1]), "image_grid_thw": grids[partner]}
    out = {"pixel_values": pixels[:rows][partner]}
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][:rows][partner]
    return out


def make_trainer_class():
    from trl import DPOTrainer
    from trl.trainer.utils import use_adapter

    class PairDPOTrainer(PairBatches, DPOTrainer):
        """DPOTrainer with whole-pair batches and the pair image-contrast term added to its loss."""

        def __init__(self, *args, image_contrast_weight: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.image_contrast_weight = image_contrast_weight

        def _chosen_logps(self, model, inputs, rows: int, images: dict[str, torch.Tensor]) -> torch.Tensor:
            text_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
            kwargs = {k: inputs[k][:rows] for k in text_keys if k in inputs}
            completion = inputs["completion_mask"][:rows]
            labels = kwargs["input_ids"].masked_fill(completion == 0, -100)
            out = model(**kwargs, **images, labels=labels, use_cache=False, fused_lm_head=True)
            return out.log_probs[:, -(completion.shape[1] - 1):].sum(dim=1)

        def image_contrast(self, model, inputs) -> torch.Tensor:
            rows = inputs["input_ids"].shape[0] // 2  # the batch is [chosen rows; rejected rows]
            if rows % 2:
                raise ValueError("the image-contrast term needs whole pairs in every batch")
            own = {k: inputs[k][:rows] for k in ("pixel_values", "image_sizes") if k in inputs and "image_grid_thw" not in inputs}
            if "image_grid_thw" in inputs:
                grids = inputs["image_grid_thw"][:rows]
                own = {"pixel_values": inputs["pixel_values"][: int(grids.prod(-1).sum())], "image_grid_thw": grids}
            partner = partner_pixels(inputs, rows)
            policy_own = self._chosen_logps(model, inputs, rows, own)
            policy_partner = self._chosen_logps(model, inputs, rows, partner)
            with torch.no_grad(), use_adapter(self.accelerator.unwrap_model(model), adapter_name=None):
                ref_own = self._chosen_logps(model, inputs, rows, own)
                ref_partner = self._chosen_logps(model, inputs, rows, partner)
            return image_contrast_loss(policy_own, ref_own, policy_partner, ref_partner, self.beta)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not self.image_contrast_weight:
                return result
            term = self.image_contrast(model, inputs)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["image_contrast"].append(term.item())
            if return_outputs:
                return result[0] + self.image_contrast_weight * term, result[1]
            return result + self.image_contrast_weight * term

    return PairDPOTrainer


def main(cfg: MllmDpoConfig) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig

    # setup -> base test scores -> train -> final test scores with the selected adapters
    strategy = cfg.strategy or ("dpo+image-contrast" if cfg.preference.image_contrast_weight else "dpo")
    run = MllmRun(RECIPE, cfg, strategy=strategy)
    base = run.base_scores()
    model = run.attach_lora()
    train_data = Dataset.from_list(preference_examples(run.train_bench, run.prompts, cfg.data, cfg.train.seed))
    sft = cfg.preference.sft_weight
    args = DPOConfig(**run.training_args(), beta=cfg.preference.beta, loss_type=["sigmoid", "sft"] if sft else ["sigmoid"],
                     loss_weights=[1.0, sft] if sft else None)
    trainer = make_trainer_class()(model=model, args=args, train_dataset=train_data, processing_class=run.adapter.processor,
                                   callbacks=[run.callback()], pairs_per_batch=cfg.train.pairs_per_batch,
                                   image_contrast_weight=cfg.preference.image_contrast_weight)
    run.train(trainer)
    return run.finish(base, trainer, preference=to_dict(cfg.preference))


CONFIG_CLASS = MllmDpoConfig


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(RECIPE, summary, argv)


if __name__ == "__main__":
    sys.exit(cli())
