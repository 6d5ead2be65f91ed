"""mllm_dpo: preference tuning of an MLLM on confusing pairs, with the pair image-contrast term.

For each image: chosen = its correct option's letter, rejected = the other letter (TRL DPOTrainer,
LoRA; the reference model is the base, reached by disabling the adapters). Plain DPO shares one
image between chosen and rejected, so it can be satisfied by text priors alone. Confusing pairs
give the missing conditional preference for free (mDPO): the same prompt and the same correct
answer should be likelier with the image it belongs to than with the pair-partner image, which
needs the opposite answer. ``image_contrast_weight: 0`` is plain DPO, the baseline.

    unconfuse train mllm_dpo --config configs/mllm_dpo/tiny.yaml [key=value ...]

Story: data (run directory, pairs, leakage audit) -> trainer arguments (before the model: ZeRO-3 partitions
it as it loads) -> model (+ LoRA) -> trainer (DPOTrainer + image-contrast term, whole-pair batches) -> base test scores (adapters
disabled) -> validation callback -> train -> test scores of the selected adapters, loaded in place.
Shares its data and LoRA settings with mllm_sft.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.runs import RunResults
from unconfuse.train import run as lifecycle
from unconfuse.train.config import TrainSettings, setting, to_dict
from unconfuse.train.data import PairBatches
from unconfuse.train.losses import image_contrast_loss
from unconfuse.train.mllm import (EvalMode, MllmData, MllmLora, attach_lora, letter_examples, load_best_adapters,
                                  load_mllm, scorer, with_eval_bos)

RECIPE = "mllm_dpo"


@dataclass
class PreferenceSettings:
    """The preference loss: DPO, the pair image-contrast term, and an optional SFT term."""

    beta: float = setting(0.1, "DPO temperature (also of the image-contrast term)", gt=0)
    image_contrast_weight: float = setting(1.0, "weight of the pair image-contrast term; 0 = plain DPO", min=0)
    sft_weight: float = setting(0.0, "RPO-style NLL on the chosen answer (TRL's sft loss term)", min=0)


@dataclass
class MllmDpoConfig:
    """mllm_dpo's settings: YAML keys, or ``key=value`` on the command line."""

    model: str = setting("tiny-llava-base", "preset, local folder or hub id of an image-text-to-text model")
    strategy: str | None = setting(None, "name that groups runs in compare and W&B (default: dpo+image-contrast, "
                                         "or dpo when the weight is 0)")
    output_dir: str | None = setting(None, "the run directory (default runs/mllm_dpo-<time>)")
    data: MllmData = setting(help="the pairs and the examples", factory=MllmData)
    lora: MllmLora = setting(help="LoRA placement", factory=MllmLora)
    preference: PreferenceSettings = setting(help="the preference loss", factory=PreferenceSettings)
    train: TrainSettings = setting(help="training settings", factory=TrainSettings)
    val_mode: EvalMode = setting("greedy", "scoring mode of the validation loop (mc generates: slow)")
    test_modes: list[EvalMode] = setting(help="scoring modes of the test split; the val mode is the main one "
                                              "(base/, test/), others go to base-<mode>/, test-<mode>/",
                                         factory=lambda: ["greedy", "prefix", "mc"])
    report_to: Literal["wandb", "none"] = setting("wandb", "W&B logging (offline without an API key)")
    allow_leakage: bool = setting(False, "train even when training images appear in the val/test pairs")
    allow_toy_data: bool = setting(False, "let a real model (not a tiny preset) train or test on the embedded "
                                          "world's 64-px images")
    resume_from_checkpoint: str | None = setting(None, "a checkpoint folder, or latest")
    force: bool = setting(False, "start afresh in an output_dir that holds another run (its contents are moved "
                                 "aside, not deleted); without it such a run is refused")
    val_batch_pairs: int = setting(8, "pairs per batch when scoring val and test", min=1)


CONFIG_CLASS = MllmDpoConfig


def preference_examples(bench: Benchmark, prompts, cfg: MllmData, seed: int, same_size_pairs: bool = False) -> list[dict[str, Any]]:
    """Two preference examples per pair (rows 2k, 2k+1): chosen = the correct letter, rejected = the other.
    ``same_size_pairs`` pads the two images of each pair onto one black canvas (no resizing), for models
    whose image-token count follows the image size (see ``image_tokens_vary``)."""
    examples = letter_examples(bench, prompts, cfg, seed)
    if same_size_pairs:
        for first, second in zip(examples[0::2], examples[1::2]):
            first["image"], second["image"] = same_canvas(first["image"], second["image"])
    return [{"images": [ex["image"]], "prompt": [{"role": "user", "content": ex["prompt"]}],
             "chosen": [{"role": "assistant", "content": ex["correct"]}],
             "rejected": [{"role": "assistant", "content": ex["other"]}]}
            for ex in examples]


def same_canvas(first, second):
    """Both images centred on a black canvas of their largest width and height (content unscaled)."""
    from PIL import ImageOps

    width, height = max(first.width, second.width), max(first.height, second.height)

    def pad(image):
        left, top = (width - image.width) // 2, (height - image.height) // 2
        return ImageOps.expand(image, (left, top, width - image.width - left, height - image.height - top), fill=0)

    return pad(first), pad(second)


def image_tokens_vary(processor) -> bool:
    """Whether the processor gives images of different sizes different numbers of image tokens (Qwen2/2.5-VL's
    dynamic resolution, LLaVA-NeXT's tiles). The image-contrast term puts a row's pair-partner image into the
    row's own prompt, so such models need both images of a pair at one size."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lengths = {len(processor(text=[text], images=[[Image.new("RGB", size)]], return_tensors="pt")["input_ids"][0])
               for size in ((64, 64), (128, 64))}
    return len(lengths) > 1


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


def main(cfg: MllmDpoConfig) -> RunResults:
    """Run the recipe; returns its run record (also in ``<run>/results.json``)."""
    from datasets import Dataset
    from trl import DPOConfig

    # data: run directory, pairs, leakage audit
    strategy = cfg.strategy or ("dpo+image-contrast" if cfg.preference.image_contrast_weight else "dpo")
    run = lifecycle.open_run(RECIPE, cfg, strategy, modes=[cfg.val_mode, *cfg.test_modes])
    sft = cfg.preference.sft_weight
    args = DPOConfig(**lifecycle.trainer_arguments(run, cfg.train), max_length=None,  # never cut image tokens
                     beta=cfg.preference.beta, loss_type=["sigmoid", "sft"] if sft else ["sigmoid"],
                     loss_weights=[1.0, sft] if sft else None)  # made before the model (ZeRO-3)

    # model + LoRA (disabling it gives the reference model), trainer, then the base scores
    adapter, spec = load_mllm(run, RECIPE)
    lifecycle.start_wandb(run, spec.name)
    model = attach_lora(adapter, cfg.lora, cfg.train.seed)
    examples = preference_examples(run.train, run.prompts, cfg.data, cfg.train.seed,
                                   same_size_pairs=bool(cfg.preference.image_contrast_weight)
                                   and image_tokens_vary(adapter.processor))
    trainer = make_trainer_class()(model=model, args=args, processing_class=with_eval_bos(adapter.processor),
                                   train_dataset=Dataset.from_list(examples), pairs_per_batch=cfg.train.pairs_per_batch,
                                   image_contrast_weight=cfg.preference.image_contrast_weight)
    evaluate = scorer(run, spec, adapter, trainer, vision_trains=cfg.lora.vision != "none" or cfg.lora.projector != "none")
    base = lifecycle.score_stage(run, "base", lambda bench, mode: evaluate(bench, mode, base=True), spec.name)

    def save_adapters(folder):
        model.save_pretrained(str(folder))
        adapter.processor.save_pretrained(str(folder))

    callback = lifecycle.validation(run, evaluate, save_adapters, val_mode=cfg.val_mode,
                                    saved_parameters=lambda: [p for p in model.parameters() if p.requires_grad])
    trainer.add_callback(callback)

    # train, then test the selected adapters (loaded into the trained model in place)
    lifecycle.train(run, trainer)
    load_best_adapters(run, model)
    final = lifecycle.score_stage(run, "test", evaluate, spec.name)
    return lifecycle.finish(run, spec.name, base, final, trainer, callback,
                            details={"preference": to_dict(cfg.preference)})


if __name__ == "__main__":
    sys.exit(lifecycle.recipe_cli(RECIPE))
