"""The TrainerCallbacks every run adds: the validation loop (the MediConfusion scorer on the validation pairs,
selecting the checkpoint), the config in every checkpoint, the NaN guard, stopping on a signal, a readable log."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from unconfuse.eval.io import atomic_write_text
from unconfuse.eval.scorer import fmt
from unconfuse.train.checkpoints import checkpoint_complete, numbered_checkpoints

VAL_KEYS = ("set_accuracy", "confusion", "individual_accuracy", "invalid")


def better(new: dict[str, float], old: dict[str, float] | None) -> bool:
    """Higher set accuracy wins; ties go to lower confusion (undefined confusion, no pair with two valid
    answers, counts as the worst)."""
    if old is None:
        return True

    def rank(row):
        return row["set_accuracy"], -(math.inf if row["confusion"] is None else row["confusion"])

    return rank(new) > rank(old)


def latest(new: dict[str, float], old: dict[str, float] | None) -> bool:
    """The newer evaluation wins (``train.selection: last``: the last checkpoint, no selection by score)."""
    return True


@dataclass
class ValidationState:
    """What the validation loop knows: every evaluation so far, and what follows from it."""

    history: list[dict[str, Any]] = field(default_factory=list)
    retention_floor: float | None = None  # rows whose retention fell more than this below step 0's are never best
    prefer: Callable[[dict[str, Any], dict[str, Any] | None], bool] = better  # whether a row beats the best so far

    def eligible(self, row: dict[str, Any]) -> bool:
        if self.retention_floor is None or not self.history:
            return True
        return row["retention"] >= self.history[0]["retention"] - self.retention_floor

    @property
    def best(self) -> dict[str, Any] | None:
        best = None
        for row in self.history:
            if self.eligible(row) and self.prefer(row, best):
                best = row
        return best

    @property
    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    @property
    def evals_without_improvement(self) -> int:
        return sum(1 for row in self.history if row["step"] > self.best_step) if self.history else 0


class PairValidationCallback(TrainerCallback):
    """Scores the model on the validation pairs at step 0 and every ``eval_steps``.

    Logs ``val/set_accuracy``, ``val/confusion``, ``val/individual_accuracy``, ``val/invalid``,
    keeps the best weights (``save_best``) by set accuracy (ties: lower confusion), and stops
    training after ``patience`` evaluations without improvement (0: never). Its state is
    ``val_history.jsonl`` (the best step follows from it), so a resumed run picks up where it stopped.
    """

    def __init__(self, run_dir: Path, evaluate: Callable[[], dict[str, Any]], save_best: Callable[[int], None],
                 eval_steps: int, patience: int = 0, is_main: bool = True, log: Callable[[dict], None] | None = None,
                 retention_floor: float | None = None, prefer: Callable[[dict, dict | None], bool] = better):
        self.run_dir, self.evaluate, self.save_best = run_dir, evaluate, save_best
        self.eval_steps, self.patience, self.is_main, self.log = eval_steps, patience, is_main, log
        path = run_dir / "val_history.jsonl"
        try:
            history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        except ValueError as exc:
            from unconfuse.eval.folders import RunDirError

            raise RunDirError(f"{path}: unreadable ({exc}); --force starts the run afresh") from None
        self.state = ValidationState(history, retention_floor, prefer)
        self.keys = VAL_KEYS + (("retention",) if retention_floor is not None else ())

    def _run(self, step: int, control) -> None:
        if any(h["step"] == step for h in self.state.history):
            return  # already done before a resume
        metrics = self.evaluate()
        row = {"step": step, **{k: metrics[k] for k in self.keys}}
        improved = self.state.eligible(row) and self.state.prefer(row, self.state.best)
        self.state.history.append(row)
        if improved:
            self.save_best(step)
        elif self.patience and self.state.evals_without_improvement >= self.patience:
            control.should_training_stop = True
        if self.is_main:  # written after the best weights, so a kill in between re-evaluates this step
            atomic_write_text(self.run_dir / "val_history.jsonl", "".join(json.dumps(h) + "\n" for h in self.state.history))
        if self.log:
            self.log({f"val/{k}": row[k] for k in self.keys} | {"val/step": step})
        if self.is_main:
            kept = "retention" in row and not self.state.eligible(row)
            print(f"validation at step {step}: set accuracy {row['set_accuracy']:.1f}, confusion {fmt(row['confusion'])}"
                  + (f", retention {row['retention']:.1f}" if "retention" in row else "")
                  + (" (best so far)" if improved else " (below the retention floor)" if kept else ""), flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._run(0, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0 or state.global_step == state.max_steps:
            self._run(state.global_step, control)


class ConfigInCheckpoints(TrainerCallback):
    """Every Trainer checkpoint folder carries the config it was made with (``config.yaml``)."""

    def __init__(self, config: Any, is_main: bool = True):
        self.config, self.is_main = config, is_main

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.is_main and folder.is_dir():
            from unconfuse.train.config import dump_config

            dump_config(self.config, folder / "config.yaml")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (exit code 3); names the step and the last good checkpoint."""


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first step whose loss or gradients are NaN or infinite, before the
    optimizer applies them and before any checkpoint of that step is saved (the Trainer's own
    ``logging_nan_inf_filter`` would hide the loss and train on). ``loss`` returns the loss
    accumulated since the last log (non-finite once any step's loss was); ``hint`` ends the message."""

    def __init__(self, loss: Callable[[], Any] | None = None, hint: str = ""):
        self.loss, self.hint = loss, hint

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        loss = self.loss() if self.loss is not None else None
        if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
            self._stop("loss", state.global_step + 1, args.output_dir)
        grads = [p.grad for p in (model.parameters() if model is not None else []) if p.grad is not None]
        # a NaN or an infinity makes its tensor's sum non-finite (+inf and -inf give NaN): one float32 sum per
        # tensor, 0.5 ms on tiny-clip-base's 96 gradients, where an isfinite per tensor took 10 ms (6% of its
        # step) and torch's inf-norm 12 ms. Only gradients near float32's limit (~1e38) could overflow the sum
        if grads and not torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()):
            self._stop("gradient", state.global_step + 1, args.output_dir)

    def _stop(self, what: str, step: int, output_dir: str):
        last = next((p for p in numbered_checkpoints(Path(output_dir)) if checkpoint_complete(p)), None)  # as resume finds it
        raise NonFiniteError(f"non-finite {what} at step {step}{f' ({self.hint})' if self.hint else ''}; "
                             + (f"last good checkpoint: {last}" if last else "no checkpoint was saved before it"))


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT during training (``unconfuse.eval.stopping``): the current optimizer step finishes,
    a complete checkpoint of it is saved, and training stops; ``stopped_at`` is then that step. Every process
    of a launch agrees on the step (the signal is reduced across processes after each step): a ZeRO
    checkpoint is a collective save, and processes signalled a step apart would otherwise wait for each other."""

    def __init__(self):
        self.stopped_at: int | None = None
        self.signum = 0

    def on_step_end(self, args, state, control, **kwargs):
        import torch
        import torch.distributed as dist

        from unconfuse.eval.stopping import stop_requested

        signum = stop_requested() or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signum], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.signum, self.stopped_at = signum, state.global_step
            control.should_save = control.should_training_stop = True
        return control


class ConsoleLog(TrainerCallback):
    """Training progress a person can read: a progress bar on a terminal, and one line per logging
    step (``step 10/300  loss 0.6931  grad_norm 0.12 ...``) instead of the Trainer's raw dicts."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True,
                            disable=not sys.stderr.isatty())

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        width = len(str(state.max_steps))
        fields = "  ".join(f"{k} {_number(v)}" for k, v in logs.items() if isinstance(v, (int, float)))
        line = f"step {state.global_step:>{width}}/{state.max_steps}  {fields}"
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4g}"
