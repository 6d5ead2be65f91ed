"""The run format: scored folders and run records, each written by one function and read by one.

A *scored folder* is ``predictions.jsonl`` + ``results.json`` + ``report.md``: one model, one mode,
one benchmark (``unconfuse eval --out``, a run's ``base/`` and ``test/``). Its results.json is the
scorer's output plus ``kind: scored`` and what produced it (model, mode, the benchmark argument).

A *run record* (``RunResults``, ``kind: run | cv``) is a training run's or a cross-validation's
``results.json``. Every run directory has one shape::

    config.yaml  leakage.json  val_history.jsonl  checkpoints/  results.json
    base/  test/                     the main mode, before and after training
    base-<mode>/  test-<mode>/       every other test mode

Readers refuse records without the current ``schema_version`` instead of guessing their layout.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .io import atomic_write_json, atomic_write_text

SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"


class RunFormatError(ValueError):
    """A folder is not a scored folder or run directory of this format; the message names it."""


# ---------------------------------------------------------------------------------------------
# Scored folders


def scored_folder(stage: Literal["base", "test"], mode: str, main_mode: str) -> str:
    """The folder of a run's scores: ``base``/``test`` for the main mode, ``base-<mode>`` otherwise."""
    return stage if mode == main_mode else f"{stage}-{mode}"


def write_scored(folder: str | Path, results: dict[str, Any], *, model: str, mode: str, benchmark: str,
                 records: list[dict[str, Any]] | None = None, title: str | None = None,
                 **meta: Any) -> dict[str, Any]:
    """Write ``folder/results.json`` and ``report.md`` (and ``predictions.jsonl`` when ``records``
    are given; ``unconfuse eval`` appends its own as it goes). ``benchmark`` is the argument that
    loads the scored pairs again; ``meta`` (strategy, seed, ...) is kept. Returns the results written."""
    from .scorer import render_report

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = {**results, "kind": "scored", "model": model, "mode": mode, "benchmark": benchmark, **meta}
    if records is not None:
        atomic_write_text(folder / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(folder / RESULTS_FILE, results)
    atomic_write_text(folder / "report.md", render_report(results, title=title or f"{model} / {mode}"))
    return results


def read_scored(folder: str | Path) -> dict[str, Any]:
    """The results.json of a scored folder (refused when the folder is something else)."""
    data = _read(Path(folder))
    if data.get("kind") != "scored":
        raise RunFormatError(f"{folder}: not a scored folder (results.json kind {data.get('kind')!r})")
    if not (Path(folder) / "predictions.jsonl").exists():
        raise RunFormatError(f"{folder}: scored folder without predictions.jsonl")
    return data


# ---------------------------------------------------------------------------------------------
# Run records


@dataclass
class RunResults:
    """What a training run (``kind: run``) or a cross-validation (``kind: cv``) ends with."""

    kind: Literal["run", "cv"]
    recipe: str
    strategy: str  # groups runs in compare and W&B (e.g. hardneg, clip-ft, sft, dpo+image-contrast)
    model: str
    train_data: str  # the training benchmark argument (cv: the benchmark that was folded)
    test_data: str  # the argument that loads the test pairs again (compare rescoring)
    seed: int
    mode: str  # the main scoring mode: base/ and test/ hold it
    base: dict[str, Any]  # scorer results of base/: the test split before training
    final: dict[str, Any]  # scorer results of test/: the selected checkpoint
    steps: int
    best_step: int | None
    best_val: dict[str, Any] | None
    wall_time_s: float  # compute time over every attempt (a run stopped by a signal and rerun has several)
    scorer_version: str
    prompt_version: str | None
    other_modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # mode -> {"base": ..., "final": ...}
    details: dict[str, Any] = field(default_factory=dict)  # recipe settings (loss, trainable, ...); cv: folds
    retention: dict[str, Any] | None = None  # eval.retention.retention_block: general ability before/after; None: not measured
    attempts: int = 1  # how many times the run was started (a stopped run's rerun resumes: one more)
    schema_version: int = SCHEMA_VERSION

    def scores(self, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(base, final) scorer results in ``mode``."""
        if mode == self.mode:
            return self.base, self.final
        if mode not in self.other_modes:
            raise KeyError(f"mode {mode!r} was not scored (modes: {', '.join([self.mode, *self.other_modes])})")
        return self.other_modes[mode]["base"], self.other_modes[mode]["final"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_run_results(run_dir: str | Path, results: RunResults) -> None:
    """``run_dir/results.json``, atomically."""
    atomic_write_json(Path(run_dir) / RESULTS_FILE, results.to_dict())


def read_run_results(run_dir: str | Path) -> RunResults:
    """The run record of a run or cv directory; older or foreign formats are refused by name."""
    run_dir = Path(run_dir)
    data = _read(run_dir)
    if data.get("kind") not in ("run", "cv"):
        raise RunFormatError(f"{run_dir}: not a run or cv directory (results.json kind {data.get('kind')!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RunFormatError(f"{run_dir}: run format {data.get('schema_version')!r}, this unconfuse reads "
                             f"{SCHEMA_VERSION}; rerun it with this version")
    names = {f.name for f in dataclasses.fields(RunResults)}
    missing = sorted(n for n in names if n not in data and n not in ("other_modes", "details", "retention", "attempts", "schema_version"))
    if missing:
        raise RunFormatError(f"{run_dir / RESULTS_FILE}: missing {', '.join(missing)}")
    return RunResults(**{k: v for k, v in data.items() if k in names})


def read_kind(folder: str | Path) -> str:
    """``scored``, ``run`` or ``cv``: what a folder's results.json says it is."""
    kind = _read(Path(folder)).get("kind")
    if kind not in ("scored", "run", "cv"):
        raise RunFormatError(f"{folder}: results.json has no run format kind (written by an older unconfuse?); "
                             "rerun it, or rescore its predictions with `unconfuse score`")
    return kind


def _read(folder: Path) -> dict[str, Any]:
    path = folder / RESULTS_FILE
    if not path.exists():
        raise RunFormatError(f"{folder}: no {RESULTS_FILE} (not a run, cv or scored folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFormatError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RunFormatError(f"{path}: expected a JSON object")
    return data
