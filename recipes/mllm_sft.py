"""mllm_sft: LoRA supervised fine-tuning of an MLLM on confusing pairs (TRL SFTTrainer).

Each image of a pair becomes one example: the scoring mode's multiple-choice prompt (the same
prompt version as eval) and the correct letter, optionally followed by the option text. The loss
is on the assistant tokens only (TRL ``assistant_only_loss``; the chat template marks generation
blocks). Both images of a pair share a batch, and by default the options are swapped (with the
answer) for half of the pairs, so no letter prior can be learned. With ``data.replay``, general questions
(answered with the right option's text) or LLaVA conversations join every batch after the pairs.

    unconfuse train mllm_sft --config configs/mllm_sft/tiny.yaml [key=value ...]

Story: data (run directory, pairs, leakage audit) -> trainer arguments (before the model: ZeRO-3 partitions
it as it loads) -> model (+ LoRA) -> trainer (SFTTrainer, whole-pair batches) -> base test scores (adapters
disabled) -> validation callback -> train -> test scores of the selected adapters, loaded in place.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

from trl import SFTConfig, SFTTrainer

from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.runs import RunResults
from unconfuse.recipes import recipe_cli
from unconfuse.train import lifecycle
from unconfuse.train.checkpoints import trainer_arguments
from unconfuse.train.config import setting
from unconfuse.train.data import PairBatches
from unconfuse.train.mllm import (AnchoredToBase, MllmData, MllmRecipeSettings, attach_lora, evaluator, letter_examples,
                                  load_best_adapters, load_mllm, replay_examples, retention_evaluator, warm_start,
                                  with_eval_bos)
from unconfuse.train.replay import with_replay

RECIPE = "mllm_sft"


@dataclass
class MllmSftConfig(MllmRecipeSettings):
    """mllm_sft's settings: YAML keys, or ``key=value`` on the command line."""

    strategy: str | None = setting(None, "name that groups runs in compare and W&B (default: sft; sft+replay with "
                                         "data.replay)")


CONFIG_CLASS = MllmSftConfig


def sft_examples(bench: Benchmark, prompts, cfg: MllmData, seed: int) -> list[dict[str, Any]]:
    """Two conversational examples per pair (one per image), in pair order: items 2k, 2k+1."""
    return [{"images": [ex["image"]], "messages": [{"role": "user", "content": ex["prompt"]},
                                                   {"role": "assistant", "content": ex["correct"]}]}
            for ex in letter_examples(bench, prompts, cfg, seed)]


class PairSFTTrainer(AnchoredToBase, PairBatches, SFTTrainer):
    """TRL's SFTTrainer whose batches hold whole pairs (both images of a pair; replay rows after them), with an
    optional L2-SP anchor of the modules trained in full (``anchor_weight``)."""


def main(cfg: MllmSftConfig, callbacks: Sequence[Any] = ()) -> RunResults:
    """Run the recipe; returns its run record (also in ``<run>/results.json``). ``callbacks``: TrainerCallbacks
    added after the run\'s own (its validation loop, checkpoints, signals)."""
    from datasets import Dataset

    # data: run directory, pairs, leakage audit
    run = lifecycle.open_run(RECIPE, cfg, cfg.strategy or with_replay("sft", cfg), modes=[cfg.val_mode, *cfg.test_modes])
    args = SFTConfig(**trainer_arguments(run, cfg.train), assistant_only_loss=True,
                     max_length=None)  # never truncate: it could cut image tokens. Made before the model (ZeRO-3)

    # model + LoRA, trainer, then the base scores (adapters disabled)
    backend, spec = load_mllm(run, RECIPE)
    model = attach_lora(backend, cfg.lora, cfg.train.seed)
    warm_start(model, run.init_adapters)  # before the trainer: TRL's reference adapter copies it
    replay = replay_examples(run, "sft", run.prompts, cfg.train.seed)
    examples = [{**row, "replay": False} for row in sft_examples(run.train, run.prompts, cfg.data, cfg.train.seed)]
    trainer = PairSFTTrainer(model=model, args=args, processing_class=with_eval_bos(backend.processor),
                             train_dataset=Dataset.from_list(examples + replay), pairs_per_batch=cfg.train.pairs_per_batch,
                             replay_items=len(replay), replay_per_batch=run.replay_per_batch,
                             anchor_weight=cfg.lora.anchor_weight)
    evaluate = evaluator(run, spec, backend, trainer, vision_trains=cfg.lora.vision != "none" or cfg.lora.projector != "none")
    retain = retention_evaluator(run, backend, trainer)
    base = lifecycle.score_stage(run, "base", lambda bench, mode: evaluate(bench, mode, base=True), spec.name,
                                 retain=lambda rset: retain(rset, base=True))

    def save_adapters(folder):
        model.save_pretrained(str(folder))
        backend.processor.save_pretrained(str(folder))

    callback = lifecycle.validation(run, evaluate, save_adapters, val_mode=cfg.val_mode,
                                    saved_parameters=lambda: [p for p in model.parameters() if p.requires_grad], retain=retain)
    trainer.add_callback(callback)

    # train, then test the selected adapters (loaded into the trained model in place)
    lifecycle.fit(run, trainer, callbacks)
    load_best_adapters(run, model)
    final = lifecycle.score_stage(run, "test", evaluate, spec.name, retain=retain)
    return lifecycle.finish(run, spec.name, base, final, trainer, callback)


if __name__ == "__main__":
    sys.exit(recipe_cli(RECIPE))
