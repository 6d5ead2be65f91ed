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

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unconfuse.eval.io import atomic_write_json
from unconfuse.eval.models import load_model, resolve_model
from unconfuse.eval.models.hf_vlm import HFVisionLanguageAdapter
from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.prompts import load_prompts
from unconfuse.eval.scorer import SCORER_VERSION
from unconfuse.recipes.mllm_sft import EVAL_MODES, DataConfig, TrainConfig
from unconfuse.train.callbacks import PairValidationCallback, predict, score_records
from unconfuse.train.config import ConfigError, dump_config, load_config, to_dict
from unconfuse.train.losses import image_contrast_loss
from unconfuse.train.mllm import LoraSettings, PairBatches, lora_config, merge_adapters
from unconfuse.train.run import (check_leakage, default_output_dir, launch_settings, log_final_to_wandb, resolve_data,
                                 setup_wandb, write_scored)

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
    from unconfuse.eval.images import load_image

    rng = np.random.default_rng(seed)
    images: dict[str, Any] = {}
    examples = []
    for pair in bench.pairs:
        swap = cfg.swap_options and bool(rng.random() < 0.5)
        options = (pair.option_b, pair.option_a) if swap else pair.options
        prompt = prompts.render(cfg.prompt_mode, pair.question, options)
        for side in (1, 2):
            ref = pair.image(side)
            if ref not in images:
                images[ref] = load_image(bench.resolve_image(ref))
            correct = pair.answer(side) if not swap else ("B" if pair.answer(side) == "A" else "A")
            other = "B" if correct == "A" else "A"
            reply = (lambda letter: f"{letter}: {options['AB'.index(letter)]}") if cfg.answer_with_option else (lambda letter: letter)
            examples.append({"images": [images[ref]], "prompt": [{"role": "user", "content": prompt}],
                             "chosen": [{"role": "assistant", "content": reply(correct)}],
                             "rejected": [{"role": "assistant", "content": reply(other)}]})
    return examples


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
    from peft import get_peft_model
    from trl import DPOConfig

    start = time.time()
    launch = launch_settings()
    # -- setup ----------------------------------------------------------------------------------
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(RECIPE)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
    for mode in [cfg.val_mode, *cfg.test_modes]:
        if mode not in EVAL_MODES:
            raise ConfigError(f"val_mode/test_modes: {mode!r} is not one of {', '.join(EVAL_MODES)}")
    train_bench, val_bench, test_bench = (resolve_data(a) for a in (cfg.data.train, cfg.data.val, cfg.data.test))
    check_leakage(run_dir, train_bench, {"val": val_bench, "test": test_bench}, cfg.allow_leakage)
    spec = resolve_model(cfg.model)
    if spec.family != "hf-vlm":
        raise ConfigError(f"model: mllm_dpo trains image-text-to-text models; {cfg.model!r} is {spec.family}")
    torch.manual_seed(cfg.train.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter, spec = load_model(spec, device=device)
    base_path = adapter.model.name_or_path
    prompts = load_prompts()
    strategy = cfg.strategy or ("dpo+image-contrast" if cfg.preference.image_contrast_weight else "dpo")
    wandb_run = setup_wandb(cfg.report_to, run_dir, to_dict(cfg), strategy, [RECIPE, spec.name, cfg.data.train]) \
        if is_main else None

    def evaluate(bench, mode: str, scorer=adapter, clear_images: bool = False):
        scorer.model.eval()
        if clear_images:
            scorer.clear_cache()
        records = predict(scorer, spec, mode, bench, prompts, cfg.val_batch_pairs)
        scorer.model.train()
        return records, score_records(bench, records, prompt_version=prompts.version)

    def write_test(name: str, records, results) -> None:
        if is_main:
            write_scored(run_dir, name, records, results, title=f"{RECIPE} {name}: {spec.name}")

    # -- base scores (test split: scored, never used for selection) ----------------------------
    base: dict[str, Any] = {}
    for mode in cfg.test_modes:
        path = run_dir / f"base-{mode}" / "results.json"
        if path.exists():
            base[mode] = json.loads(path.read_text())
        else:
            records, base[mode] = evaluate(test_bench, mode)
            write_test(f"base-{mode}", records, base[mode])

    # -- model with adapters, data -------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)  # LoRA init must not depend on whether the base model was just built
    model = get_peft_model(adapter.model, lora_config(cfg.lora))
    adapter.model = model.get_base_model()
    vision_trains = cfg.lora.vision != "none" or cfg.lora.projector != "none"
    train_data = Dataset.from_list(preference_examples(train_bench, prompts, cfg.data, cfg.train.seed))
    best_dir = run_dir / "checkpoints" / "best"

    def save_best(step: int) -> None:
        if is_main:
            model.save_pretrained(str(best_dir))
            adapter.processor.save_pretrained(str(best_dir))
            (best_dir / "step.txt").write_text(str(step))

    callback = PairValidationCallback(run_dir, lambda: evaluate(val_bench, cfg.val_mode, clear_images=vision_trains)[1],
                                      save_best, cfg.train.eval_steps, cfg.train.patience, is_main=is_main,
                                      log=(lambda row: wandb_run.log(row)) if wandb_run else None)
    loss_types = ["sigmoid", "sft"] if cfg.preference.sft_weight else ["sigmoid"]
    args = DPOConfig(
        output_dir=str(run_dir / "checkpoints"), max_steps=cfg.train.max_steps,
        per_device_train_batch_size=2 * cfg.train.pairs_per_batch, learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay, warmup_steps=cfg.train.warmup_steps, lr_scheduler_type=cfg.train.lr_scheduler,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, max_grad_norm=cfg.train.max_grad_norm,
        logging_steps=cfg.train.logging_steps, save_strategy="steps", save_steps=cfg.train.save_steps,
        seed=cfg.train.seed, data_seed=cfg.train.seed, bf16=cfg.train.bf16, beta=cfg.preference.beta,
        loss_type=loss_types, loss_weights=[1.0, cfg.preference.sft_weight] if cfg.preference.sft_weight else None,
        gradient_checkpointing=cfg.train.gradient_checkpointing, report_to=["wandb"] if wandb_run else [],
        dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(), **launch,
        max_length=None,  # never truncate: it could cut image tokens
    )
    trainer = make_trainer_class()(model=model, args=args, train_dataset=train_data, processing_class=adapter.processor,
                                   callbacks=[callback], pairs_per_batch=cfg.train.pairs_per_batch,
                                   image_contrast_weight=cfg.preference.image_contrast_weight)
    resume = cfg.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.accelerator.wait_for_everyone()

    # -- final test scores with the selected adapters, merged as `unconfuse merge` does --------
    merged, processor = merge_adapters(best_dir, base_path)
    scorer = HFVisionLanguageAdapter(base_path, name=spec.name, model=merged, processor=processor, device=device,
                                     system_prompt=spec.system_prompt)
    final = {}
    for mode in cfg.test_modes:
        records, final[mode] = evaluate(test_bench, mode, scorer)
        write_test(f"test-{mode}", records, final[mode])
    main_mode = cfg.val_mode if cfg.val_mode in final else cfg.test_modes[0]
    results = {"recipe": RECIPE, "strategy": strategy, "model": spec.name, "data": cfg.data.train, "seed": cfg.train.seed,
               "base": base[main_mode], "final": final[main_mode], "base_by_mode": base, "final_by_mode": final,
               "best_step": callback.state.best_step, "best_val": callback.state.best, "steps": trainer.state.global_step,
               "wall_time_s": time.time() - start, "scorer_version": SCORER_VERSION, "prompt_version": prompts.version,
               "preference": to_dict(cfg.preference)}
    if is_main:
        atomic_write_json(run_dir / "results.json", results)
        log_final_to_wandb(wandb_run, results, run_dir / f"test-{main_mode}" / "predictions.jsonl")
    return results


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m unconfuse.recipes.{RECIPE}")
    parser.add_argument("--config", help="recipe YAML (configs/mllm_dpo/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. preference.image_contrast_weight=0")
    args = parser.parse_args(argv)
    results = main(load_config(MllmDpoConfig, args.config, args.overrides))
    print(json.dumps({"strategy": results["strategy"], "best_step": results["best_step"], "steps": results["steps"]}
                     | {f"{n}_{mode}_{m}": results[f"{n}_by_mode"][mode][m] for n in ("base", "final")
                        for mode in results["final_by_mode"] for m in ("set_accuracy", "confusion")}))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
