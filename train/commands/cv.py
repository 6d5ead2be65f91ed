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
from unconfuse.eval.io import atomic_write_json, atomic_write_text
from unconfuse.eval.pairs import write_jsonl
from unconfuse.eval.runs import RunResults, read_run_results, write_run_results, write_scored
from unconfuse.eval.scorer import read_predictions
from unconfuse.eval.splits import fold_benchmark, grouped_folds, write_splits
from unconfuse.recipes import recipe_module
from unconfuse.train.callbacks import score_records
from unconfuse.train.config import dump_config, load_config
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
           overrides: list[str] | None = None) -> RunResults:
    """Train and test ``recipe`` once per fold; write the cv run record and the pooled predictions.
    Folds whose run directory already has its run record are reused (rerun to resume)."""
    from unconfuse.eval.world import prepare

    out = Path(out)
    start = time.time()
    prepare(benchmarks=[benchmark])
    bench = load_benchmark(benchmark)
    splits_dir = out / "splits"
    previous = splits_dir / "splits.json"
    if previous.exists():
        settings = json.loads(previous.read_text())
        if (settings["folds"], settings["seed"], settings["pairs"]) != (folds, seed, len(bench.pairs)):
            raise ValueError(f"{out} holds a cv over other folds ({settings['folds']} folds, seed {settings['seed']}, "
                             f"{settings['pairs']} pairs); use another --out")
    splits = write_splits(bench, folds, splits_dir, seed)
    assignment = [splits["assignment"][p.id] for p in bench.pairs]
    fold_runs: list[RunResults] = []
    for k in range(folds):
        run_dir = out / f"fold-{k}"
        if not (run_dir / "results.json").exists():
            data_dir = run_dir / "data"
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
    dump_config(load_config(recipe_module(recipe).CONFIG_CLASS, config, list(overrides or [])), out / "config.yaml")
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
                                     title=f"cv {recipe} ({folds} folds, pooled {stage})")
    per_fold = [{"fold": k, "best_step": r.best_step, **{m: r.final[m] for m in METRICS},
                 **{f"base_{m}": r.base[m] for m in METRICS}} for k, r in enumerate(fold_runs)]
    results = RunResults(
        kind="cv", recipe=recipe, strategy=first.strategy, model=first.model, train_data=benchmark, test_data=benchmark,
        seed=first.seed, mode=first.mode, base=pooled["base"], final=pooled["test"],
        steps=sum(r.steps for r in fold_runs), best_step=None, best_val=None, wall_time_s=time.time() - start,
        scorer_version=first.scorer_version, prompt_version=first.prompt_version,
        details={"folds": folds, "split_seed": seed, "per_fold": per_fold,
                 "fold_mean": {m: float(np.mean([r[m] for r in per_fold])) for m in METRICS},
                 "fold_std": {m: float(np.std([r[m] for r in per_fold], ddof=1)) for m in METRICS}})
    write_run_results(out, results)
    return results


def cv_summary(results: RunResults) -> str:
    """Per fold and pooled, as printed by ``unconfuse cv``."""
    details = results.details
    lines = [f"{'fold':>6} {'set acc':>8} {'confusion':>10} {'base set acc':>13}"]
    lines += [f"{r['fold']:>6} {r['set_accuracy']:>8.1f} {r['confusion']:>10.1f} {r['base_set_accuracy']:>13.1f}"
              for r in details["per_fold"]]
    mean, std = details["fold_mean"], details["fold_std"]
    lines.append(f"mean over folds: set accuracy {mean['set_accuracy']:.1f} ± {std['set_accuracy']:.1f}, "
                 f"confusion {mean['confusion']:.1f} ± {std['confusion']:.1f}")
    for name, res in (("base", results.base), ("trained", results.final)):
        lo, hi = res["ci"]["set_accuracy"]
        clo, chi = res["ci"]["confusion"]
        lines.append(f"pooled {name} ({res['n_pairs']} pairs): set accuracy {res['set_accuracy']:.1f} [{lo:.1f}, {hi:.1f}], "
                     f"confusion {res['confusion']:.1f} [{clo:.1f}, {chi:.1f}]")
    return "\n".join(lines)
