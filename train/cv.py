"""``unconfuse cv``: grouped K-fold cross-validation of a recipe over a benchmark.

For each fold k: train on the other folds, validate (checkpoint selection) on one of them, test on
fold k. Each fold is a normal run directory (``CV/fold-<k>``); the cv directory holds the splits,
the aggregate over folds (mean and std), and all folds' test predictions pooled into one
prediction file over the whole benchmark, scored with bootstrap CIs. The cv directory has the
shape of a run directory (``results.json`` with ``base`` and ``final``, ``base/`` and ``test/``),
so ``unconfuse compare`` reads it like any run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from unconfuse.eval.io import atomic_write_json
from unconfuse.eval.pairs import Benchmark, load_benchmark, write_jsonl
from unconfuse.eval.scorer import read_predictions
from unconfuse.eval.splits import fold_benchmark, grouped_folds, write_splits
from unconfuse.train.callbacks import score_records
from unconfuse.train.run import run_recipe, write_scored

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
           overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and test ``recipe`` once per fold; write the aggregate and the pooled predictions.
    Folds whose run directory already has results.json are reused (rerun to resume)."""
    out = Path(out)
    start = time.time()
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
    fold_results = []
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
        fold_results.append(json.loads((run_dir / "results.json").read_text()))

    pooled = {}
    for name in ("base", "test"):
        records = []
        for k, res in enumerate(fold_results):
            records += read_predictions(out / f"fold-{k}" / res[f"{name}_dir"] / "predictions.jsonl").values()
        pooled[name] = score_records(bench, records, prompt_version=fold_results[0].get("prompt_version"))
        write_scored(out, name, records, pooled[name], title=f"cv {recipe} ({folds} folds, pooled {name})")
    per_fold = [{"fold": k, "best_step": r["best_step"], **{m: r["final"][m] for m in METRICS},
                 **{f"base_{m}": r["base"][m] for m in METRICS}} for k, r in enumerate(fold_results)]
    first = fold_results[0]
    results = {"kind": "cv", "recipe": recipe, "strategy": first["strategy"], "model": first["model"],
               "data": benchmark, "test_data": benchmark, "seed": first["seed"], "folds": folds, "split_seed": seed,
               "base": pooled["base"], "final": pooled["test"], "base_dir": "base", "test_dir": "test",
               "per_fold": per_fold,
               "fold_mean": {m: float(np.mean([r[m] for r in per_fold])) for m in METRICS},
               "fold_std": {m: float(np.std([r[m] for r in per_fold], ddof=1)) for m in METRICS},
               "prompt_version": first.get("prompt_version"), "scorer_version": first.get("scorer_version"),
               "wall_time_s": time.time() - start}
    atomic_write_json(out / "results.json", results)
    return results


def cv_summary(results: dict[str, Any]) -> str:
    """Per fold and pooled, as printed by ``unconfuse cv``."""
    lines = [f"{'fold':>6} {'set acc':>8} {'confusion':>10} {'base set acc':>13}"]
    lines += [f"{r['fold']:>6} {r['set_accuracy']:>8.1f} {r['confusion']:>10.1f} {r['base_set_accuracy']:>13.1f}"
              for r in results["per_fold"]]
    mean, std = results["fold_mean"], results["fold_std"]
    lines.append(f"mean over folds: set accuracy {mean['set_accuracy']:.1f} ± {std['set_accuracy']:.1f}, "
                 f"confusion {mean['confusion']:.1f} ± {std['confusion']:.1f}")
    for name, key in (("base", "base"), ("trained", "final")):
        res = results[key]
        lo, hi = res["ci"]["set_accuracy"]
        clo, chi = res["ci"]["confusion"]
        lines.append(f"pooled {name} ({res['n_pairs']} pairs): set accuracy {res['set_accuracy']:.1f} [{lo:.1f}, {hi:.1f}], "
                     f"confusion {res['confusion']:.1f} [{clo:.1f}, {chi:.1f}]")
    return "\n".join(lines)
