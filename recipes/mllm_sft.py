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

import sys
from dataclasses import dataclass, field
from typing import Any

from unconfuse.eval.pairs import Benchmark
from unconfuse.train.run import recipe_cli
from unconfuse.train.mllm import DataConfig, LoraSettings, MllmRun, PairBatches, TrainConfig, letter_examples, summary

RECIPE = "mllm_sft"


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
    return [{"images": [ex["image"]], "messages": [{"role": "user", "content": ex["prompt"]},
                                                   {"role": "assistant", "content": ex["correct"]}]}
            for ex in letter_examples(bench, prompts, cfg, seed)]


def main(cfg: MllmSftConfig) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class PairSFTTrainer(PairBatches, SFTTrainer):
        """SFTTrainer whose batches hold whole pairs (both images of a pair)."""

    # setup -> base test scores -> train -> final test scores with the selected adapters
    run = MllmRun(RECIPE, cfg, strategy=cfg.strategy or "sft")
    base = run.base_scores()
    model = run.attach_lora()
    train_data = Dataset.from_list(sft_examples(run.train_bench, run.prompts, cfg.data, cfg.train.seed))
    args = SFTConfig(**run.training_args(), assistant_only_loss=True)
    trainer = PairSFTTrainer(model=model, args=args, train_dataset=train_data, processing_class=run.adapter.processor,
                             callbacks=[run.callback()], pairs_per_batch=cfg.train.pairs_per_batch)
    run.train(trainer)
    return run.finish(base, trainer)


CONFIG_CLASS = MllmSftConfig


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(RECIPE, summary, argv)


if __name__ == "__main__":
    sys.exit(cli())
