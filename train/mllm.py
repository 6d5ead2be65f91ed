"""What the MLLM recipes share: LoRA placement, whole-pair batches for TRL trainers, adapter merging,
the data and training settings, and the run lifecycle (``MllmRun``)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from unconfuse.train.callbacks import PairValidationCallback, predict, score_records
from unconfuse.train.config import ConfigError, dump_config, to_dict
from unconfuse.train.data import PairBatchSampler
from unconfuse.train.run import TrainConfig as BaseTrainConfig
from unconfuse.train.run import (check_leakage, default_output_dir, launch_settings, log_final_to_wandb, resolve_data,
                                 setup_wandb, trainer_arguments, write_scored)

# LoRA targets by part, as regexes over module names (LLaVA / Qwen2-VL / Gemma3 naming)
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r".*(multi_modal_projector\.linear_\d|merger\.mlp\.\d|mm_input_projection)"
VISION_TARGETS = r".*(vision_tower|visual\.blocks).*\.(q_proj|k_proj|v_proj|out_proj|qkv|proj|fc1|fc2)"


@dataclass
class LoraSettings:
    """LoRA on the language model by default; the projector and the vision tower optionally."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    projector: str = "none"  # none | lora | full: also adapt the multimodal projector
    vision: str = "none"  # none | lora | full: also adapt the vision tower


class PairBatches:
    """Mixin for TRL trainers: batches of whole pairs (dataset rows 2k and 2k+1 are a pair's two images)."""

    def __init__(self, *args, pairs_per_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_per_batch = pairs_per_batch

    def get_train_dataloader(self) -> DataLoader:
        sampler = PairBatchSampler(len(self.train_dataset) // 2, self.pairs_per_batch, seed=self.args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=0)
        return self.accelerator.prepare(loader)


def lora_config(settings: LoraSettings):
    """LoRA on the language model's attention and MLP projections, plus the parts asked for."""
    from peft import LoraConfig

    for part in ("projector", "vision"):
        if getattr(settings, part) not in ("none", "lora", "full"):
            raise ConfigError(f"lora.{part}: must be none, lora or full, got {getattr(settings, part)!r}")
    targets = [LM_TARGETS]
    if settings.projector == "lora":
        targets.append(PROJECTOR_TARGETS)
    if settings.vision == "lora":
        targets.append(VISION_TARGETS)
    trainable = [name for part, name in (("projector", "multi_modal_projector"), ("vision", "vision_tower"))
                 if getattr(settings, part) == "full"]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules="(" + "|".join(targets) + ")$", modules_to_save=trainable or None,
                      task_type="CAUSAL_LM")


def merge_adapters(adapter_dir: Path, base: str | None = None):
    """The base model with the LoRA adapters of ``adapter_dir`` merged in, and its processor."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = AutoModelForImageTextToText.from_pretrained(base, use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    processor = AutoProcessor.from_pretrained(str(adapter_dir) if (adapter_dir / "processor_config.json").exists() else base)
    return model, processor


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
class TrainConfig(BaseTrainConfig):
    gradient_checkpointing: bool = False


def letter_examples(bench, prompts, cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """Per image, in pair order (items 2k, 2k+1): the image, the prompt as presented (options swapped
    with the answer for half of the pairs when ``swap_options``) and the correct and other replies."""
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

        def reply(letter: str) -> str:
            return f"{letter}: {options['AB'.index(letter)]}" if cfg.answer_with_option else letter

        for side in (1, 2):
            ref = pair.image(side)
            if ref not in images:
                images[ref] = load_image(bench.resolve_image(ref))
            correct = pair.answer(side)
            if swap:
                correct = "B" if correct == "A" else "A"
            other = "B" if correct == "A" else "A"
            examples.append({"image": images[ref], "prompt": prompt, "correct": reply(correct), "other": reply(other)})
    return examples


class MllmRun:
    """The lifecycle both MLLM recipes share: run directory, data, leakage audit, model, W&B, base and
    final test scores (never used for selection), LoRA, the validation callback and results.json.
    A recipe adds its examples, its TRL config and its trainer."""

    def __init__(self, recipe: str, cfg, strategy: str):
        from unconfuse.eval.models import load_model, resolve_model
        from unconfuse.eval.prompts import load_prompts

        self.recipe, self.cfg, self.strategy, self.start = recipe, cfg, strategy, time.time()
        self.launch = launch_settings()
        self.run_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(recipe)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        if self.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
        for mode in [cfg.val_mode, *cfg.test_modes]:
            if mode not in EVAL_MODES:
                raise ConfigError(f"val_mode/test_modes: {mode!r} is not one of {', '.join(EVAL_MODES)}")
        self.train_bench, self.val_bench, self.test_bench = (resolve_data(a) for a in (cfg.data.train, cfg.data.val, cfg.data.test))
        check_leakage(self.run_dir, self.train_bench, {"val": self.val_bench, "test": self.test_bench}, cfg.allow_leakage)
        spec = resolve_model(cfg.model)
        if spec.family != "hf-vlm":
            raise ConfigError(f"model: {recipe} trains image-text-to-text models; {cfg.model!r} is {spec.family}")
        torch.manual_seed(cfg.train.seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.adapter, self.spec = load_model(spec, device=self.device)
        self.base_path = self.adapter.model.name_or_path
        self.prompts = load_prompts()
        self.wandb = setup_wandb(cfg.report_to, self.run_dir, to_dict(cfg), strategy, [recipe, self.spec.name, cfg.data.train]) \
            if self.is_main else None
        self.best_dir = self.run_dir / "checkpoints" / "best"
        self.model = None

    def evaluate(self, bench, mode: str, scorer=None, clear_images: bool = False):
        scorer = scorer or self.adapter
        scorer.model.eval()
        if clear_images:
            scorer.clear_cache()
        records = predict(scorer, self.spec, mode, bench, self.prompts, self.cfg.val_batch_pairs)
        scorer.model.train()
        return records, score_records(bench, records, prompt_version=self.prompts.version)

    def _write(self, name: str, records, results) -> None:
        if self.is_main:
            write_scored(self.run_dir, name, records, results, title=f"{self.recipe} {name}: {self.spec.name}")

    def base_scores(self) -> dict[str, Any]:
        """The test split before training, in every test mode (reused on resume)."""
        base: dict[str, Any] = {}
        for mode in self.cfg.test_modes:
            path = self.run_dir / f"base-{mode}" / "results.json"
            if path.exists():
                base[mode] = json.loads(path.read_text())
            else:
                records, base[mode] = self.evaluate(self.test_bench, mode)
                self._write(f"base-{mode}", records, base[mode])
        return base

    def attach_lora(self):
        """The model with LoRA adapters; the scorer keeps seeing it (the layers live in its base model)."""
        from peft import get_peft_model

        torch.manual_seed(self.cfg.train.seed)  # LoRA init must not depend on whether the base model was just built
        self.model = get_peft_model(self.adapter.model, lora_config(self.cfg.lora))
        self.adapter.model = self.model.get_base_model()
        return self.model

    def callback(self) -> PairValidationCallback:
        vision_trains = self.cfg.lora.vision != "none" or self.cfg.lora.projector != "none"

        def save_best(step: int) -> None:
            if self.is_main:
                self.model.save_pretrained(str(self.best_dir))
                self.adapter.processor.save_pretrained(str(self.best_dir))
                (self.best_dir / "step.txt").write_text(str(step))

        self.validation = PairValidationCallback(
            self.run_dir, lambda: self.evaluate(self.val_bench, self.cfg.val_mode, clear_images=vision_trains)[1],
            save_best, self.cfg.train.eval_steps, self.cfg.train.patience, is_main=self.is_main,
            log=(lambda row: self.wandb.log(row)) if self.wandb else None)
        return self.validation

    def training_args(self) -> dict[str, Any]:
        """The TrainingArguments both TRL configs take from the recipe config."""
        return dict(**trainer_arguments(self.cfg.train, self.run_dir, self.wandb is not None, self.launch),
                    gradient_checkpointing=self.cfg.train.gradient_checkpointing,
                    max_length=None)  # never truncate: it could cut image tokens

    def train(self, trainer) -> None:
        resume = self.cfg.resume_from_checkpoint
        trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
        trainer.accelerator.wait_for_everyone()

    def finish(self, base: dict[str, Any], trainer, **extra: Any) -> dict[str, Any]:
        """Score the selected adapters, merged as `unconfuse merge` does, on the test split; write results.json."""
        from unconfuse.eval.io import atomic_write_json
        from unconfuse.eval.models.hf_vlm import HFVisionLanguageAdapter
        from unconfuse.eval.scorer import SCORER_VERSION

        merged, processor = merge_adapters(self.best_dir, self.base_path)
        scorer = HFVisionLanguageAdapter(self.base_path, name=self.spec.name, model=merged, processor=processor,
                                         device=self.device, system_prompt=self.spec.system_prompt)
        final = {}
        for mode in self.cfg.test_modes:
            records, final[mode] = self.evaluate(self.test_bench, mode, scorer)
            self._write(f"test-{mode}", records, final[mode])
        cfg = self.cfg
        main_mode = cfg.val_mode if cfg.val_mode in final else cfg.test_modes[0]
        results = {"recipe": self.recipe, "strategy": self.strategy, "model": self.spec.name, "data": cfg.data.train,
                   "seed": cfg.train.seed, "base": base[main_mode], "final": final[main_mode], "base_by_mode": base,
                   "final_by_mode": final, "best_step": self.validation.state.best_step,
                   "best_val": self.validation.state.best, "steps": trainer.state.global_step,
                   "wall_time_s": time.time() - self.start, "scorer_version": SCORER_VERSION,
                   "prompt_version": self.prompts.version, "test_data": cfg.data.test,
                   "base_dir": f"base-{main_mode}", "test_dir": f"test-{main_mode}", **extra}
        if self.is_main:
            atomic_write_json(self.run_dir / "results.json", results)
            log_final_to_wandb(self.wandb, results, self.run_dir / f"test-{main_mode}" / "predictions.jsonl")
        return results


def summary(results: dict[str, Any]) -> str:
    """One JSON line: strategy, best step, and base/final set accuracy and confusion per test mode."""
    return json.dumps({"strategy": results["strategy"], "best_step": results["best_step"], "steps": results["steps"]}
                      | {f"{n}_{mode}_{m}": results[f"{n}_by_mode"][mode][m] for n in ("base", "final")
                         for mode in results["final_by_mode"] for m in ("set_accuracy", "confusion")})
