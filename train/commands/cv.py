"""``unconfuse cv``: grouped K-fold cross-validation of a recipe over a benchmark.

For each fold k: train on the other folds, validate (checkpoint selection) on one of them, test on
fold k. Each fold is a normal run directory (``CV/fold-<k>``); the cv directory holds the splits,
the aggregate over folds (mean and std), and all folds' test predictions pooled into one
prediction file over the whole benchmark, scored with bootstrap CIs. The cv directory has the
shape of a run directory (config.yaml, leakage.json and val_history.jsonl over the folds, base/,
test/, a ``kind: cv`` run record), so ``unconfuse compare`` reads it like any run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from unconfuse.eval.benchmarks import Benchmark, load_benchmark
from unconfuse.eval.io import atomic_write_json, atomic_write_text, owned_folder
from unconfuse.eval.pairs import write_jsonl
from unconfuse.eval.runs import RunResults, read_run_results, write_run_results, write_scored
from unconfuse.eval.scorer import fmt, fmt_ci, read_predictions
from unconfuse.eval.splits import fold_benchmark, grouped_folds, write_splits
from unconfuse.recipes import recipe_module
from unconfuse.train.callbacks import score_records
from unconfuse.train.config import dump_config, load_config, to_dict
from unconfuse.train.run import run_recipe

METRICS = ("set_accuracy", "confusion", "individual_accuracy")


def fold_data(bench: Benchmark, assignment: list[int], folds: int, k: int, seed: int) -> dict[str, Benchmark]:
    """train / val / test benchmarks of fold ``k``. Validation is the next fold when there are at
    least three; with two, a grouped quarter of the training fold (so it never shares an image)."""
    test = fold_benchmark(bench, assignment, [k], f"fold-{k}-test")
    rest = [f for f in range(folds) if f != k]
    if len(rest) >= 2:
        val_fold = (k + 1) % folds
        return {"train": fold_benchmark(bench, assignment, [f for f in rest if f != val_fold], f"fold-{k}-train"),
                "val": fold_benchmark(bench, assignment, [val_fold], f"fold-{k}-val"), "test": test}
    train_all = fold_benchmark(bench, assignment, rest, f"fold-{k}-trainval")
    inner = grouped_folds(train_all, 4, seed)
    return {"train": fold_benchmark(train_all, inner, [1, 2, 3], f"fold-{k}-train"),
            "val": fold_benchmark(train_all, inner, [0], f"fold-{k}-val"), "test": test}


def run_cv(recipe: str, config: str, folds: int, benchmark: str, out: str | Path, seed: int = 0,
           overrides: list[str] | None = None, force: bool = False) -> RunResults:
    """Train and test ``recipe`` once per fold; write the cv run record and the pooled predictions.
    The cv directory is owned for the whole run (``unconfuse.eval.io.owned_folder``): rerun with the
    same settings to resume (folds with their run record are reused); other settings, folds or data
    are refused unless ``force``."""
    from unconfuse.eval.world import prepare

    out = Path(out)
    prepare(benchmarks=[benchmark])
    bench = load_benchmark(benchmark)
    cfg = load_config(recipe_module(recipe).CONFIG_CLASS, config, list(overrides or []))
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("output_dir", "resume_from_checkpoint", "report_to", "force", "data")}
    fingerprint = {"command": f"cv {recipe}", "settings": settings, "folds": folds, "split_seed": seed,
                   "data": bench.fingerprint()}
    with owned_folder(out, fingerprint, force=force, what=f"cv of {recipe}"):
        return _run_folds(recipe, config, cfg, folds, benchmark, bench, out, seed, overrides)


def _run_folds(recipe: str, config: str, cfg: Any, folds: int, benchmark: str, bench: Benchmark, out: Path, seed: int,
               overrides: list[str] | None) -> RunResults:
    start = time.time()
    splits_dir = out / "splits"
    splits = write_splits(bench, folds, splits_dir, seed)
    assignment = [splits["assignment"][p.id] for p in bench.pairs]
    fold_runs: list[RunResults] = []
    for k in range(folds):
        run_dir = out / f"fold-{k}"
        if not (run_dir / "results.json").exists():
            data_dir = splits_dir / f"fold-{k}"  # the fold's train/val/test pairs (not in its run directory, which it owns)
            paths = {}
            for name, part in fold_data(bench, assignment, folds, k, seed).items():
                paths[name] = data_dir / f"{name}.jsonl"
                write_jsonl(part.pairs, paths[name])
            print(f"cv fold {k + 1}/{folds}: {recipe} on {sum(1 for a in assignment if a != k)} pairs "
                  f"(test: {sum(1 for a in assignment if a == k)} pairs)", flush=True)
            run_recipe(recipe, config, [*(overrides or []), f"output_dir={run_dir}", f"data.train={paths['train']}",
                                        f"data.val={paths['val']}", f"data.test={paths['test']}"])
        fold_runs.append(read_run_results(run_dir))

    first = fold_runs[0]
    dump_config(cfg, out / "config.yaml")
    atomic_write_json(out / "leakage.json", {"folds": {f"fold-{k}": json.loads((out / f"fold-{k}" / "leakage.json").read_text())
                                                       for k in range(folds)}})
    atomic_write_text(out / "val_history.jsonl", "".join(
        json.dumps({"fold": k, **json.loads(line)}) + "\n" for k in range(folds)
        for line in (out / f"fold-{k}" / "val_history.jsonl").read_text().splitlines() if line.strip()))
    pooled = {}
    for stage in ("base", "test"):
        records = [r for k in range(folds) for r in read_predictions(out / f"fold-{k}" / stage / "predictions.jsonl").values()]
        pooled[stage] = write_scored(out / stage, score_records(bench, records, prompt_version=first.prompt_version),
                                     records=records, model=first.model, mode=first.mode, benchmark=benchmark,
                                     strategy="base" if stage == "base" else first.strategy, seed=first.seed,
                                     benchmark_fingerprint=bench.fingerprint(),
                                     title=f"cv {recipe} ({folds} folds, pooled {stage})")
    per_fold = [{"fold": k, "best_step": r.best_step, **{m: r.final[m] for m in METRICS},
                 **{f"base_{m}": r.base[m] for m in METRICS}} for k, r in enumerate(fold_runs)]
    results = RunResults(
        kind="cv", recipe=recipe, strategy=first.strategy, model=first.model, train_data=benchmark, test_data=benchmark,
        seed=first.seed, mode=first.mode, base=pooled["base"], final=pooled["test"],
        steps=sum(r.steps for r in fold_runs), best_step=None, best_val=None, wall_time_s=time.time() - start,
        scorer_version=first.scorer_version, prompt_version=first.prompt_version,
        details={"folds": folds, "split_seed": seed, "per_fold": per_fold,
                 "fold_mean": {m: _mean(r[m] for r in per_fold) for m in METRICS},
                 "fold_std": {m: _std(r[m] for r in per_fold) for m in METRICS}})
    write_run_results(out, results)
    return results


def _mean(values) -> float | None:
    """Over the folds where the metric is defined; None (null) where it is in none."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _std(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.std(defined, ddof=1)) if len(defined) > 1 else None


def cv_summary(results: RunResults) -> str:
    """Per fold and pooled, as printed by ``unconfuse cv``."""
    details = results.details
    lines = [f"{'fold':>6} {'set acc':>8} {'confusion':>10} {'base set acc':>13}"]
    lines += [f"{r['fold']:>6} {r['set_accuracy']:>8.1f} {fmt(r['confusion']):>10} {r['base_set_accuracy']:>13.1f}"
              for r in details["per_fold"]]
    mean, std = details["fold_mean"], details["fold_std"]
    lines.append(f"mean over folds: set accuracy {fmt(mean['set_accuracy'])} ± {fmt(std['set_accuracy'])}, "
                 f"confusion {fmt(mean['confusion'])} ± {fmt(std['confusion'])}")
    for name, res in (("base", results.base), ("trained", results.final)):
        lines.append(f"pooled {name} ({res['n_pairs']} pairs): set accuracy {fmt(res['set_accuracy'])} "
                     f"{fmt_ci(res['ci']['set_accuracy'])}, confusion {fmt(res['confusion'])} {fmt_ci(res['ci']['confusion'])}")
    return "\n".join(lines)
