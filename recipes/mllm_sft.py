"""mllm_sft: LoRA supervised fine-tuning of an MLLM on confusing pairs (TRL SFTTrainer).

Each image of a pair becomes one example: the scoring mode's multiple-choice prompt (the same
prompt version as eval) and the correct letter, optionally followed by the option text. The loss
is on the assistant tokens only (TRL ``assistant_only_loss``; the chat template marks generation
blocks). Both images of a pair share a batch, and by default the options are swapped (with the
answer) for half of the pairs, so no letter prior can be learned.

    unconfuse train mllm_sft --config configs/mllm_sft/tiny.yaml [key=value ...]

Story: data (run directory, pairs, leakage audit) -> trainer arguments (before the model: ZeRO-3 partitions
it as it loads) -> model (+ LoRA) -> trainer (SFTTrainer, whole-pair batches) -> base test scores (adapters
disabled) -> validation callback -> train -> test scores of the selected adapters, loaded in place.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.runs import RunResults
from unconfuse.train import run as lifecycle
from unconfuse.train.config import TrainSettings, setting
from unconfuse.train.data import PairBatches
from unconfuse.train.mllm import (EvalMode, MllmData, MllmLora, attach_lora, letter_examples, load_best_adapters,
                                  load_mllm, retention_scorer, scorer, with_eval_bos)

RECIPE = "mllm_sft"


@dataclass
class MllmSftConfig:
    """mllm_sft's settings: YAML keys, or ``key=value`` on the command line."""

    model: str = setting("tiny-llava-base", "preset, local folder or hub id of an image-text-to-text model")
    strategy: str | None = setting(None, "name that groups runs in compare and W&B (default: sft)")
    output_dir: str | None = setting(None, "the run directory (default runs/mllm_sft-<time>)")
    data: MllmData = setting(help="the pairs and the examples", factory=MllmData)
    lora: MllmLora = setting(help="LoRA placement", factory=MllmLora)
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


CONFIG_CLASS = MllmSftConfig


def sft_examples(bench: Benchmark, prompts, cfg: MllmData, seed: int) -> list[dict[str, Any]]:
    """Two conversational examples per pair (one per image), in pair order: items 2k, 2k+1."""
    return [{"images": [ex["image"]], "messages": [{"role": "user", "content": ex["prompt"]},
                                                   {"role": "assistant", "content": ex["correct"]}]}
            for ex in letter_examples(bench, prompts, cfg, seed)]


def main(cfg: MllmSftConfig) -> RunResults:
    """Run the recipe; returns its run record (also in ``<run>/results.json``)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class PairSFTTrainer(PairBatches, SFTTrainer):
        """SFTTrainer whose batches hold whole pairs (both images of a pair)."""

    # data: run directory, pairs, leakage audit
    run = lifecycle.open_run(RECIPE, cfg, cfg.strategy or "sft", modes=[cfg.val_mode, *cfg.test_modes])
    args = SFTConfig(**lifecycle.trainer_arguments(run, cfg.train), assistant_only_loss=True,
                     max_length=None)  # never truncate: it could cut image tokens. Made before the model (ZeRO-3)

    # model + LoRA, trainer, then the base scores (adapters disabled)
    adapter, spec = load_mllm(run, RECIPE)
    lifecycle.start_wandb(run, spec.name)
    model = attach_lora(adapter, cfg.lora, cfg.train.seed)
    trainer = PairSFTTrainer(model=model, args=args, processing_class=with_eval_bos(adapter.processor),
                             train_dataset=Dataset.from_list(sft_examples(run.train, run.prompts, cfg.data, cfg.train.seed)),
                             pairs_per_batch=cfg.train.pairs_per_batch)
    evaluate = scorer(run, spec, adapter, trainer, vision_trains=cfg.lora.vision != "none" or cfg.lora.projector != "none")
    retain = retention_scorer(run, adapter, trainer)
    base = lifecycle.score_stage(run, "base", lambda bench, mode: evaluate(bench, mode, base=True), spec.name,
                                 retain=lambda rset: retain(rset, base=True))

    def save_adapters(folder):
        model.save_pretrained(str(folder))
        adapter.processor.save_pretrained(str(folder))

    callback = lifecycle.validation(run, evaluate, save_adapters, val_mode=cfg.val_mode,
                                    saved_parameters=lambda: [p for p in model.parameters() if p.requires_grad], retain=retain)
    trainer.add_callback(callback)

    # train, then test the selected adapters (loaded into the trained model in place)
    lifecycle.train(run, trainer)
    load_best_adapters(run, model)
    final = lifecycle.score_stage(run, "test", evaluate, spec.name, retain=retain)
    return lifecycle.finish(run, spec.name, base, final, trainer, callback)


if __name__ == "__main__":
    sys.exit(lifecycle.recipe_cli(RECIPE))
