"""mllm_sft: LoRA supervised fine-tuning of an MLLM on confusing pairs (TRL SFTTrainer).

Each image of a pair becomes one example: the scoring mode's multiple-choice prompt (the same
prompt version as eval) and the correct letter, optionally followed by the option text. The loss
is on the assistant tokens only (TRL ``assistant_only_loss``; the chat template marks generation
blocks). Both images of a pair share a batch, and by default the options are swapped (with the
answer) for half of the pairs, so no letter prior can be learned.

    unconfuse train mllm_sft --config configs/mllm_sft/tiny.yaml [key=value ...]

Skeleton: setup (run directory, data, leakage audit, model + LoRA, W&B) -> base test score ->
train (SFTTrainer, validation callback) -> final test score with the selected adapters -> save.
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
from unconfuse.train.callbacks import PairValidationCallback, predict, score_records
from unconfuse.train.config import ConfigError, dump_config, load_config, to_dict
from unconfuse.train.mllm import LoraSettings, PairBatches, lora_config, merge_adapters
from unconfuse.train.run import (check_leakage, default_output_dir, launch_settings, log_final_to_wandb, resolve_data,
                                 setup_wandb, write_scored)

RECIPE = "mllm_sft"
EVAL_MODES = ("greedy", "prefix", "mc")


@dataclass
class DataConfig:
    train: str = "world:train"
    val: str = "world:val"
    test: str = "world:test"
    prompt_mode: str = "greedy"  # whose prompt the examples use (greedy or mc)
    answer_with_option: bool = False  # reply "A" or "A: <option text>"
    swap_options: bool = True  # present the options in swapped order (answers flipped) for half of the pairs


@dataclass
class TrainConfig:
    max_steps: int = 100
    pairs_per_batch: int = 4  # per device; a batch holds 2x this many examples
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    lr_scheduler: str = "cosine"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    eval_steps: int = 25
    save_steps: int = 50
    logging_steps: int = 10
    patience: int = 0
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False


@dataclass
class MllmSftConfig:
    """Every field can be set in YAML or as ``key=value`` on the command line."""

    model: str = "tiny-llava-base"
    strategy: str | None = None  # default: sft
    output_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_mode: str = "greedy"  # greedy | prefix | mc (generation: slow)
    test_modes: list[str] = field(default_factory=lambda: ["greedy", "prefix", "mc"])
    report_to: str = "wandb"
    allow_leakage: bool = False
    resume_from_checkpoint: str | None = None
    val_batch_pairs: int = 8


def sft_examples(bench: Benchmark, prompts, cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """Two conversational examples per pair (one per image), in pair order: items 2k, 2k+1."""
    from unconfuse.eval.images import load_image

    if cfg.prompt_mode not in ("greedy", "mc"):
        raise ConfigError(f"data.prompt_mode: must be greedy or mc, got {cfg.prompt_mode!r}")
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
            letter = pair.answer(side)
            if swap:
                letter = "B" if letter == "A" else "A"
            reply = f"{letter}: {options['AB'.index(letter)]}" if cfg.answer_with_option else letter
            examples.append({"images": [images[ref]],
                             "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    return examples


def main(cfg: MllmSftConfig) -> dict[str, Any]:
    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTConfig

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
        raise ConfigError(f"model: mllm_sft trains image-text-to-text models; {cfg.model!r} is {spec.family}")
    torch.manual_seed(cfg.train.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter, spec = load_model(spec, device=device)
    base_path = adapter.model.name_or_path
    prompts = load_prompts()
    strategy = cfg.strategy or "sft"
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
    adapter.model = model.get_base_model()  # LoRA layers live inside it: the scorer sees the trained model
    vision_trains = cfg.lora.vision != "none" or cfg.lora.projector != "none"
    train_data = Dataset.from_list(sft_examples(train_bench, prompts, cfg.data, cfg.train.seed))
    best_dir = run_dir / "checkpoints" / "best"

    def save_best(step: int) -> None:
        if is_main:
            model.save_pretrained(str(best_dir))
            adapter.processor.save_pretrained(str(best_dir))
            (best_dir / "step.txt").write_text(str(step))

    callback = PairValidationCallback(run_dir, lambda: evaluate(val_bench, cfg.val_mode, clear_images=vision_trains)[1],
                                      save_best, cfg.train.eval_steps, cfg.train.patience, is_main=is_main,
                                      log=(lambda row: wandb_run.log(row)) if wandb_run else None)
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"), max_steps=cfg.train.max_steps,
        per_device_train_batch_size=2 * cfg.train.pairs_per_batch, learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay, warmup_steps=cfg.train.warmup_steps, lr_scheduler_type=cfg.train.lr_scheduler,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, max_grad_norm=cfg.train.max_grad_norm,
        logging_steps=cfg.train.logging_steps, save_strategy="steps", save_steps=cfg.train.save_steps,
        seed=cfg.train.seed, data_seed=cfg.train.seed, bf16=cfg.train.bf16,
        gradient_checkpointing=cfg.train.gradient_checkpointing, report_to=["wandb"] if wandb_run else [],
        dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(), **launch,
        assistant_only_loss=True, max_length=None,  # never truncate: it could cut image tokens
    )
    from trl import SFTTrainer

    class PairSFTTrainer(PairBatches, SFTTrainer):
        """SFTTrainer whose batches hold whole pairs (both images of a pair)."""

    trainer = PairSFTTrainer(model=model, args=args, train_dataset=train_data, processing_class=adapter.processor,
                                   callbacks=[callback], pairs_per_batch=cfg.train.pairs_per_batch)
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
    results = {"recipe": RECIPE, "strategy": strategy, "model": spec.name, "data": cfg.data.train, "seed": cfg.train.seed,
               "base": base[cfg.val_mode if cfg.val_mode in base else cfg.test_modes[0]],
               "final": final[cfg.val_mode if cfg.val_mode in final else cfg.test_modes[0]],
               "base_by_mode": base, "final_by_mode": final, "best_step": callback.state.best_step,
               "best_val": callback.state.best, "steps": trainer.state.global_step, "wall_time_s": time.time() - start,
               "scorer_version": SCORER_VERSION, "prompt_version": prompts.version}
    if is_main:
        atomic_write_json(run_dir / "results.json", results)
        main_mode = cfg.val_mode if cfg.val_mode in final else cfg.test_modes[0]
        log_final_to_wandb(wandb_run, results, run_dir / f"test-{main_mode}" / "predictions.jsonl")
    return results


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m unconfuse.recipes.{RECIPE}")
    parser.add_argument("--config", help="recipe YAML (configs/mllm_sft/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    results = main(load_config(MllmSftConfig, args.config, args.overrides))
    print(json.dumps({"strategy": results["strategy"], "best_step": results["best_step"], "steps": results["steps"]}
                     | {f"{n}_{mode}_{m}": results[f"{n}_by_mode"][mode][m] for n in ("base", "final")
                        for mode in results["final_by_mode"] for m in ("set_accuracy", "confusion")}))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
