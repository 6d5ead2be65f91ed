"""Training speed of the recipes against plain scripts of the same library trainer, and where a run's time goes.

1. For mllm_sft, mllm_dpo, mllm_grpo and clip_hardneg: the recipe runs as a user runs it (``run_recipe`` with the tiny config;
   no anchor, plain DPO, no distillation; no validation or checkpoint inside the timed window), and a plain script of
   the same library trainer (TRL's SFTTrainer / DPOTrainer, no subclass; for clip_hardneg a plain open_clip loop with
   the recipe's loss, the Trainer's optimizer, parameter groups, schedule and clipping) trains a fresh copy of the
   same base model with the same LoRA (same seed), the same hyperparameters and the recipe's own batches (the rows the
   recipe's whole-pair sampler drew, in its order; TRL's ``train_sampling_strategy="sequential"``) and processor.
   The per-step losses must agree (to ``--tolerance``) before any time is compared. Training time is the Trainer's
   loop (``on_train_begin`` to ``on_train_end``) less the validations and checkpoint saves inside it.
   Repeats are interleaved in alternating order (recipe then plain, plain then recipe, ...: the second in a process
   finds warm caches); the ratio is plain time / recipe time
   (>= 0.95: the recipe trains as fast as the plain script).
2. ``--shares``: one default run of ``configs/mllm_sft/tiny.yaml`` (600 steps) split into startup, base and test
   scoring, validations, training steps and the rest.

For mllm_grpo the plain script is TRL's GRPOTrainer with the recipe's two reward functions (letter and pair: the job,
which a user writes anyway), the recipe's arguments (its letter rollouts are TRL's own ``generation_kwargs``) and
the prompts in the order the recipe's whole-pair sampler drew them (``shuffle_dataset=False``: TRL's RepeatSampler
then repeats each ``num_generations`` times in turn, as the recipe's does); the same seed then samples the same
rollouts. GRPO's loss is ~0 by construction, so what is checked equal for it is each generation batch's sum of
|advantage| (``_instrument``).

    python bench/train_overhead.py [--steps 40] [--repeats 3] [--shares]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from unconfuse.train import lifecycle  # noqa: E402
from unconfuse.train.data import PairBatchSampler, PairRepeatSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"mllm_sft": REPO / "configs/mllm_sft/tiny.yaml", "mllm_dpo": REPO / "configs/mllm_dpo/tiny.yaml",
           "mllm_grpo": REPO / "configs/mllm_grpo/tiny.yaml", "clip_hardneg": REPO / "configs/clip_hardneg/tiny.yaml"}


class LoopClock(TrainerCallback):
    """The training loop's wall time; ``spent`` (time inside the loop that is not training) restarts with it:
    callbacks added before this one (the step-0 validation) run before the clock starts."""

    def __init__(self, spent: list[float]):
        self.start = self.end = 0.0
        self.allocated_at_start = 0
        self.spent = spent

    def on_train_begin(self, args, state, control, **kwargs):
        self.spent.clear()
        # on a GPU, what the loop starts with (weights, adapters, the step-0 scoring's leftovers): bench/gpu_scale.py
        # compares it with the plan's weights
        self.allocated_at_start = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


@dataclasses.dataclass
class Timed:
    """One training: its loop time less what ran inside it besides training, and its per-step losses."""

    seconds: float
    losses: list[float]


def _instrument(trainer, spent: list[float], losses: list[float]) -> LoopClock:
    """Record every loss ``compute_loss`` returns, time checkpoint saves into ``spent``; returns the loop clock.
    A GRPOTrainer's loss is ~0 by construction (one optimizer step per generation batch: ratio 1, advantages centred
    per group), so for it the recorded number is each generation batch's sum of |advantage| instead: it moves with
    every sampled rollout and every reward, so two runs agree on it only if they sampled the same completions."""
    from trl import GRPOTrainer

    compute_loss, save = trainer.compute_loss, trainer._save_checkpoint

    def recorded_loss(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    if isinstance(trainer, GRPOTrainer):
        generate_and_score = trainer._generate_and_score_completions

        def recorded_advantages(*args, **kwargs):
            out = generate_and_score(*args, **kwargs)
            losses.append(float(out["advantages"].abs().sum()))
            return out

        trainer._generate_and_score_completions = recorded_advantages  # the advantages stand for the loss
    else:
        trainer.compute_loss = recorded_loss

    def timed_save(*args, **kwargs):
        start = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    trainer._save_checkpoint = timed_save
    clock = LoopClock(spent)
    trainer.add_callback(clock)
    return clock


def run_recipe_captured(recipe: str, steps: int, out: Path, seed: int = 0, config: str | Path | None = None,
                        overrides: list[str] | None = None) -> dict[str, Any]:
    """The recipe as a user runs it (``config``, default its tiny one, then ``overrides``), with its trainer,
    batches (dataset row indices), run and training-loop timing captured."""
    from unconfuse.recipes import run_recipe

    captured: dict[str, Any] = {"batches": [], "spent": [], "losses": []}
    sampler_iter, train, validation = PairBatchSampler.__iter__, lifecycle.fit, lifecycle.validation
    repeat_iter = PairRepeatSampler.__iter__

    def recorded_batches(self):
        for batch in sampler_iter(self):
            captured["batches"].append(list(batch))
            yield batch

    def recorded_stream(self):  # grpo: one index per completion, a prompt's num_generations copies in a row
        for index in repeat_iter(self):
            captured["batches"].append(int(index))
            yield index

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                captured["spent"].append(time.perf_counter() - start)
        return wrapper

    def timed_validation(*args, **kwargs):  # the validations and best-checkpoint writes inside the loop
        callback = validation(*args, **kwargs)
        callback.evaluate, callback.save_best = timed(callback.evaluate), timed(callback.save_best)
        return callback

    def captured_train(run, trainer, callbacks=()):
        captured.update(run=run, trainer=trainer)
        captured["clock"] = _instrument(trainer, captured["spent"], captured["losses"])
        return train(run, trainer, callbacks)

    overrides = [f"output_dir={out}", "force=true", "report_to=none", f"train.seed={seed}", f"train.max_steps={steps}",
                 f"train.eval_steps={10 * steps}", f"train.save_steps={10 * steps}", "train.logging_steps=1000",
                 *([] if recipe == "clip_hardneg" else ["test_modes=[greedy]"]), *(overrides or [])]
    PairBatchSampler.__iter__, lifecycle.fit, lifecycle.validation = recorded_batches, captured_train, timed_validation
    PairRepeatSampler.__iter__ = recorded_stream
    try:
        captured["results"] = run_recipe(recipe, str(config or CONFIGS[recipe]), overrides)
    finally:
        PairBatchSampler.__iter__, lifecycle.fit, lifecycle.validation = sampler_iter, train, validation
        PairRepeatSampler.__iter__ = repeat_iter
    clock = captured["clock"]
    captured["timed"] = Timed(clock.end - clock.start - sum(captured["spent"]), captured["losses"])
    return captured


def plain_trainer(recipe: str, captured: dict[str, Any], out: Path):
    """What a user writes with TRL alone: the library's trainer class, the same base, LoRA, hyperparameters and
    rows in the recipe's batch order (sequential sampling), no unconfuse trainer code."""
    from peft import get_peft_model
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    from unconfuse.eval.models import load_model, resolve_model
    from unconfuse.recipes.mllm_grpo import reward_functions
    from unconfuse.train.mllm import lora_config, with_eval_bos

    run, recipe_trainer = captured["run"], captured["trainer"]
    if recipe == "mllm_grpo":
        args = recipe_trainer.args
        generations, trained = recipe_trainer.num_generations, args.max_steps * args.generation_batch_size
        if args.steps_per_generation * args.num_iterations != 1:
            raise SystemExit("mllm_grpo: the plain script takes one step per generation batch")
        order = captured["batches"][:trained:generations]  # the prompts in the recipe's order, once each
    else:
        order = [i for batch in captured["batches"] for i in batch]
    rows = recipe_trainer.train_dataset.select(order)
    if "replay" in rows.column_names:
        rows = rows.remove_columns("replay")
    spec = resolve_model(run.cfg.model)
    if run.cfg.train.bf16:
        spec = dataclasses.replace(spec, dtype="bfloat16")
    backend, _ = load_model(spec, device=str(recipe_trainer.args.device))
    torch.manual_seed(run.cfg.train.seed)  # as the recipe seeds LoRA's init
    model = get_peft_model(backend.model, lora_config(backend.model, run.cfg.lora))
    # grpo: generation_batch_size was derived from steps_per_generation; GRPOConfig refuses both set
    grpo = {"generation_batch_size": None, "shuffle_dataset": False} if recipe == "mllm_grpo" else {}
    args = dataclasses.replace(recipe_trainer.args, output_dir=str(out), train_sampling_strategy="sequential",
                               save_strategy="no", report_to=[], logging_steps=1000, **grpo)
    if recipe == "mllm_grpo":  # TRL's RepeatSampler, unshuffled: each prompt num_generations times, in the rows' order
        return GRPOTrainer(model=model, reward_funcs=reward_functions(), args=args,
                           processing_class=with_eval_bos(backend.processor), train_dataset=rows)
    trainer_class = SFTTrainer if recipe == "mllm_sft" else DPOTrainer
    return trainer_class(model=model, args=args, processing_class=with_eval_bos(backend.processor), train_dataset=rows)


def plain_clip_loop(captured: dict[str, Any]) -> Timed:
    """clip_hardneg's counterpart, the open_clip way: no Trainer, a loop over the recipe's batches (its collator and
    dataset rows) with the recipe's loss function on a fresh copy of the same encoder, made trainable the same way,
    and the optimizer, parameter groups, schedule and clipping the Trainer uses (so the losses can agree)."""
    from dataclasses import replace

    from transformers import get_scheduler

    from unconfuse.eval.models import load_model, resolve_model
    from unconfuse.recipes.clip_hardneg import clip_hardneg_loss, freeze, hf_clip_encoder, open_clip_encoder

    run, recipe_trainer = captured["run"], captured["trainer"]
    cfg, args = run.cfg, recipe_trainer.args
    spec = replace(resolve_model(cfg.model), clip_prompt="question" if cfg.data.text == "question_option" else "default")
    torch.manual_seed(cfg.train.seed)
    backend, spec = load_model(spec, device="cpu")
    encoder = (open_clip_encoder if spec.family == "open-clip" else hf_clip_encoder)(backend, spec)
    torch.manual_seed(cfg.train.seed)
    freeze(encoder, cfg.trainable, cfg.lora)
    model = encoder.trained.train()
    decay = set(recipe_trainer.get_decay_parameter_names(model))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in trained if n not in decay], "weight_decay": 0.0}]
    used = getattr(recipe_trainer.optimizer, "optimizer", recipe_trainer.optimizer)  # inside accelerate's wrapper
    accepted = inspect.signature(type(used)).parameters
    optimizer = type(used)(groups, **{k: v for k, v in used.defaults.items() if k in accepted and k != "weight_decay"})
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                             num_training_steps=args.max_steps)
    collate, loss_cfg = recipe_trainer.data_collator, cfg.loss
    # the recipe's rows with their replay images not decoded yet, as the recipe found them (its dataset keeps each
    # replay image it decoded: reusing it as it is would hand the plain loop every replay image for free)
    rows = copy.copy(recipe_trainer.train_dataset)
    rows._replay_pixels = {}
    losses = []
    start = time.perf_counter()
    for indices in captured["batches"][:args.max_steps]:
        batch = collate([rows[i] for i in indices])
        out = model(batch["pixel_values"], batch["input_ids"])
        loss = clip_hardneg_loss(out[0], out[1], out[2], batch["text_ids"], batch["partner"], loss_cfg.hardneg_weight,
                                 loss_cfg.image_side_weight, replay=batch["replay"],
                                 hardneg_label_smoothing=loss_cfg.hardneg_label_smoothing)["loss"]
        losses.append(float(loss.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return Timed(time.perf_counter() - start, losses)


def train_plain(trainer) -> Timed:
    spent: list[float] = []
    losses: list[float] = []
    clock = _instrument(trainer, spent, losses)
    trainer.train()
    return Timed(clock.end - clock.start - sum(spent), losses)


def compare(recipe: str, steps: int, repeats: int, tolerance: float, work: Path) -> dict[str, Any]:
    """Interleaved repeats of the recipe and its plain script, in alternating order (recipe first, then plain first:
    whichever runs second in a process finds its caches warm); the losses checked equal before the ratio."""
    recipe_times, plain_times = [], []
    # the plain scripts' losses, so they can be compared: no anchor, plain DPO (no image-contrast term), no teacher
    same_loss = {"mllm_sft": ["lora.anchor_weight=0"], "mllm_dpo": ["lora.anchor_weight=0", "preference.image_contrast_weight=0"],
                 "mllm_grpo": ["lora.anchor_weight=0"], "clip_hardneg": ["loss.distill_weight=0"]}[recipe]

    def plain_of(captured: dict[str, Any], repeat: int) -> Timed:
        return plain_clip_loop(captured) if recipe == "clip_hardneg" else \
            train_plain(plain_trainer(recipe, captured, work / f"{recipe}-plain-{repeat}"))

    previous = None
    for repeat in range(repeats):
        if repeat % 2 and previous is not None:  # plain first, on the batches the recipe drew before (the same seed)
            plain = plain_of(previous, repeat)
            captured = run_recipe_captured(recipe, steps, work / f"{recipe}-{repeat}", overrides=same_loss)
            if captured["batches"] != previous["batches"]:
                raise SystemExit(f"{recipe}: the recipe drew other batches in repeat {repeat}; the plain script's are stale")
        else:
            captured = run_recipe_captured(recipe, steps, work / f"{recipe}-{repeat}", overrides=same_loss)
            plain = plain_of(captured, repeat)
        previous = captured
        mine = captured["timed"]
        if len(plain.losses) != len(mine.losses) or len(mine.losses) < steps:
            raise SystemExit(f"{recipe}: {len(mine.losses)} recipe losses, {len(plain.losses)} plain ones")
        worst = max(abs(a - b) for a, b in zip(mine.losses, plain.losses))
        if worst > tolerance:
            raise SystemExit(f"{recipe}: losses differ by {worst:.2e} (> {tolerance:g}); the speeds are not comparable")
        recipe_times.append(mine.seconds)
        plain_times.append(plain.seconds)
    return {"recipe": recipe, "steps": steps, "max_loss_difference": worst, "losses": mine.losses,
            "recipe_s": statistics.median(recipe_times), "plain_s": statistics.median(plain_times),
            "ratios": [p / r for p, r in zip(plain_times, recipe_times)]}


def shares(work: Path) -> dict[str, float]:
    """Where a default tiny sft run's wall time goes (seconds per phase)."""
    from unconfuse.recipes import run_recipe

    phases = {"scoring (base, test)": 0.0, "validations": 0.0, "training loop": 0.0}
    score_stage, validation, train = lifecycle.score_stage, lifecycle.validation, lifecycle.fit

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] += time.perf_counter() - start
        return wrapper

    def timed_validation(run, evaluate, *args, **kwargs):
        return validation(run, timed("validations", evaluate), *args, **kwargs)

    lifecycle.score_stage, lifecycle.validation = timed("scoring (base, test)", score_stage), timed_validation
    lifecycle.fit = timed("training loop", train)
    start = time.perf_counter()
    try:
        run_recipe("mllm_sft", str(REPO / "configs/mllm_sft/tiny.yaml"), [f"output_dir={work / 'shares'}", "force=true",
                                                                          "report_to=none"])
    finally:
        lifecycle.score_stage, lifecycle.validation, lifecycle.fit = score_stage, validation, train
    total = time.perf_counter() - start
    phases["training loop"] -= phases["validations"]  # validations run inside the loop
    phases["startup and the rest"] = total - sum(phases.values())
    phases["total"] = total
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest per-step loss difference allowed")
    parser.add_argument("--recipes", default="mllm_sft,mllm_dpo,mllm_grpo,clip_hardneg")
    parser.add_argument("--shares", action="store_true", help="also split a default 600-step sft run's wall time")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        print(f"{'recipe':<10}{'steps':>6}{'max |loss diff|':>17}{'recipe s':>10}{'plain s':>9}  plain/recipe (each repeat)")
        for recipe in args.recipes.split(","):
            row = compare(recipe, args.steps, args.repeats, args.tolerance, Path(tmp))
            print(f"{recipe:<10}{row['steps']:>6}{row['max_loss_difference']:>17.1e}{row['recipe_s']:>10.2f}"
                  f"{row['plain_s']:>9.2f}  {statistics.median(row['ratios']):.3f}x "
                  f"({', '.join(f'{r:.3f}' for r in row['ratios'])})", flush=True)
        if args.shares:
            phases = shares(Path(tmp))
            total = phases.pop("total")
            print(f"\ndefault tiny sft run (configs/mllm_sft/tiny.yaml, 600 steps): {total:.0f} s")
            for key, seconds in phases.items():
                print(f"  {key:<24}{seconds:>8.1f} s  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
