"""The validation loop: the MediConfusion scorer on the validation pairs, as a TrainerCallback."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from unconfuse.eval.io import atomic_write_json
from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.runner import EvalConfig, answer_pairs
from unconfuse.eval.scorer import resolve_answers, score

VAL_KEYS = ("set_accuracy", "confusion", "individual_accuracy", "invalid")


def predict(adapter, spec, mode: str, bench: Benchmark, prompts, batch_pairs: int = 16, parser: str = "strict"):
    """Prediction records for every pair of ``bench`` (the same code path as ``unconfuse eval``)."""
    cfg = EvalConfig(model=spec.name, mode=mode, benchmark=bench.name, out="", parser=parser)
    records = []
    for start in range(0, len(bench.pairs), batch_pairs):
        records += answer_pairs(adapter, spec, cfg, prompts, bench, bench.pairs[start:start + batch_pairs])
    return records


def score_records(bench: Benchmark, records: list[dict[str, Any]], parser: str = "strict", prompt_version=None,
                  bootstrap_samples: int = 10_000) -> dict[str, Any]:
    predictions = {(r["pair_id"], r["image"]): r for r in records}
    return score(bench.pairs, resolve_answers(bench.pairs, predictions, parser), parser=parser,
                 prompt_version=prompt_version, bootstrap_samples=bootstrap_samples)


def better(new: dict[str, float], old: dict[str, float] | None) -> bool:
    """Higher set accuracy wins; ties go to lower confusion."""
    if old is None:
        return True
    return (new["set_accuracy"], -new["confusion"]) > (old["set_accuracy"], -old["confusion"])


@dataclass
class ValidationState:
    """What the callback must remember across a kill and a resume (kept in the run directory)."""

    best: dict[str, Any] | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class PairValidationCallback(TrainerCallback):
    """Scores the model on the validation pairs at step 0 and every ``eval_steps``.

    Logs ``val/set_accuracy``, ``val/confusion``, ``val/individual_accuracy``, ``val/invalid``,
    keeps the best weights (``save_best``) by set accuracy (ties: lower confusion), and stops
    training after ``patience`` evaluations without improvement (0: never). Its state lives in
    ``val_history.jsonl`` and ``best.json``, so a resumed run picks up where it stopped.
    """

    def __init__(self, run_dir: Path, evaluate: Callable[[], dict[str, Any]], save_best: Callable[[int], None],
                 eval_steps: int, patience: int = 0, is_main: bool = True, log: Callable[[dict], None] | None = None):
        self.run_dir, self.evaluate, self.save_best = run_dir, evaluate, save_best
        self.eval_steps, self.patience, self.is_main, self.log = eval_steps, patience, is_main, log
        self.state = self._load()

    def _load(self) -> ValidationState:
        path = self.run_dir / "best.json"
        if not path.exists():
            return ValidationState()
        data = json.loads(path.read_text())
        return ValidationState(**data)

    def _persist(self, step: int) -> None:
        if not self.is_main:
            return
        atomic_write_json(self.run_dir / "best.json", self.state.__dict__)
        lines = "".join(json.dumps(h) + "\n" for h in self.state.history)
        from unconfuse.eval.io import atomic_write_text

        atomic_write_text(self.run_dir / "val_history.jsonl", lines)

    def _run(self, step: int, control) -> None:
        if any(h["step"] == step for h in self.state.history):
            return  # already done before a resume
        metrics = self.evaluate()
        row = {"step": step, **{k: metrics[k] for k in VAL_KEYS}}
        self.state.history.append(row)
        if better(row, self.state.best):
            self.state.best, self.state.best_step = row, step
            self.state.evals_without_improvement = 0
            self.save_best(step)
        else:
            self.state.evals_without_improvement += 1
            if self.patience and self.state.evals_without_improvement >= self.patience:
                control.should_training_stop = True
        self._persist(step)
        if self.log:
            self.log({f"val/{k}": row[k] for k in VAL_KEYS} | {"val/step": step})

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._run(0, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0 or state.global_step == state.max_steps:
            self._run(state.global_step, control)
