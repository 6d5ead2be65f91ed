"""``unconfuse cv``: grouped K-fold cross-validation of a recipe over a benchmark.

For each fold k: train on the other folds, validate (checkpoint selection) on one of them, test on
fold k. Each fold is a normal run directory (``CV/fold-<k>``); the cv directory holds the splits,
the aggregate over folds (mean and std), and all folds' test predictions pooled into one
prediction file over the whole benchmark, scored with bootstrap CIs. The cv directory has the
shape of a run directory (config.yaml, leakage.json and val_history.jsonl over the folds, base/,
test/, a ``kind: cv`` run record), so ``unconfuse compare`` reads it like any run.

Folds also run as separate jobs, side by side (``--fold K``: ``run_fold``), then pool with
``--collect`` (``collect_cv``) into the same cv directory, with the same numbers as the sequential
run: that is how ``unconfuse study`` spreads a study over a cluster.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from unconfuse.eval.benchmarks import Benchmark, load_benchmark
from unconfuse.eval.evaluation import score_records
from unconfuse.eval.folders import join_folder, owned_folder
from unconfuse.eval.io import atomic_write_json, atomic_write_text
from unconfuse.eval.pairs import write_jsonl
from unconfuse.eval.retention import pooled_retention_block, read_records
from unconfuse.eval.runs import RunResults, read_run_results, write_run_results, write_scored
from unconfuse.eval.scorer import fmt, fmt_ci, read_predictions
from unconfuse.eval.splits import fold_benchmark, grouped_folds, write_splits
from unconfuse.recipes import recipe_module, run_recipe
from unconfuse.train.callbacks import NonFiniteError
from unconfuse.train.config import dump_config, load_config, to_dict
from unconfuse.train.run_data import check_toy_data

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


class MissingFolds(ValueError):
    """``--collect`` before every fold has finished; the message lists the folds that have not."""


def _open_cv(recipe: str, config: str, folds: int, benchmark: str, seed: int, overrides: list[str] | None):
    """The benchmark, the recipe config and the cv fingerprint (what every job of this cv must share)."""
    from unconfuse.eval.world import prepare

    prepare(benchmarks=[benchmark])
    bench = load_benchmark(benchmark)
    cfg = load_config(recipe_module(recipe).CONFIG_CLASS, config, list(overrides or []))
    check_toy_data(cfg, benchmark)
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("output_dir", "resume_from_checkpoint", "report_to", "force", "data")}
    fingerprint = {"command": f"cv {recipe}", "settings": settings, "folds": folds, "split_seed": seed,
                   "data": bench.fingerprint()}
    return bench, cfg, fingerprint


def run_cv(recipe: str, config: str, folds: int, benchmark: str, out: str | Path, seed: int = 0,
           overrides: list[str] | None = None, force: bool = False, launch: str | None = None) -> RunResults:
    """Train and test ``recipe`` once per fold, one fold after another; write the cv run record and
    the pooled predictions. The cv directory is owned for the whole run (``unconfuse.eval.folders.owned_folder``):
    rerun with the same settings to resume (folds with their run record are reused, including folds
    run alone with ``run_fold``); other settings, folds or data are refused unless ``force``. With
    ``launch`` (an accelerate config), each fold trains under ``accelerate launch``."""
    out = Path(out)
    bench, cfg, fingerprint = _open_cv(recipe, config, folds, benchmark, seed, overrides)
    with owned_folder(out, fingerprint, force=force, what=f"cv of {recipe}"):
        assignment = _write_splits(bench, folds, out, seed)
        for k in range(folds):
            if not (out / f"fold-{k}" / "results.json").exists():
                _train_fold(recipe, config, bench, assignment, folds, k, out, seed, overrides, launch,
                            getattr(cfg, "init_adapters", None))
        return _collect(recipe, cfg, folds, benchmark, bench, out, seed)


def run_fold(recipe: str, config: str, folds: int, benchmark: str, out: str | Path, fold: int, seed: int = 0,
             overrides: list[str] | None = None, launch: str | None = None) -> RunResults:
    """Fold ``fold`` of a cv alone (``unconfuse cv ... --fold K``): its run directory ``out/fold-<K>``
    (owned by the recipe's run, resumable, with its own launch), so that folds run as separate jobs,
    side by side. The cv directory is joined, not owned: a job with other settings is refused.
    ``collect_cv`` pools the folds once all have finished."""
    if not 0 <= fold < folds:
        raise ValueError(f"--fold {fold}: a cv of {folds} folds has folds 0 to {folds - 1}")
    out = Path(out)
    bench, cfg, fingerprint = _open_cv(recipe, config, folds, benchmark, seed, overrides)
    join_folder(out, fingerprint, what=f"cv of {recipe}")
    if not (out / f"fold-{fold}" / "results.json").exists():
        _train_fold(recipe, config, bench, _write_splits(bench, folds, out, seed), folds, fold, out, seed, overrides, launch,
                    getattr(cfg, "init_adapters", None))
    return read_run_results(out / f"fold-{fold}")


def collect_cv(recipe: str, config: str, folds: int, benchmark: str, out: str | Path, seed: int = 0,
               overrides: list[str] | None = None) -> RunResults:
    """Pool the finished folds of a cv run as separate jobs (``unconfuse cv ... --collect``), exactly
    as the sequential cv pools them. Refuses, listing them, while any fold has not finished."""
    out = Path(out)
    bench, cfg, fingerprint = _open_cv(recipe, config, folds, benchmark, seed, overrides)
    if not out.is_dir():
        raise MissingFolds(f"{out}: no cv here yet; run its folds first (unconfuse cv {recipe} ... --fold K)")
    with owned_folder(out, fingerprint, what=f"cv of {recipe}"):
        missing = [f"fold-{k} ({'started, not finished' if (out / f'fold-{k}').exists() else 'not started'})"
                   for k in range(folds) if not (out / f"fold-{k}" / "results.json").exists()]
        if missing:
            raise MissingFolds(f"{out}: {len(missing)} of {folds} folds have no results yet: {', '.join(missing)}; "
                               f"run each with `unconfuse cv {recipe} ... --fold K` (same settings), then --collect again")
        return _collect(recipe, cfg, folds, benchmark, bench, out, seed)


def _write_splits(bench: Benchmark, folds: int, out: Path, seed: int) -> list[int]:
    """``out/splits`` (deterministic: every job of a cv writes the same files) and each pair's fold."""
    splits = write_splits(bench, folds, out / "splits", seed)
    return [splits["assignment"][p.id] for p in bench.pairs]


def _train_fold(recipe: str, config: str, bench: Benchmark, assignment: list[int], folds: int, k: int, out: Path,
                seed: int, overrides: list[str] | None, launch: str | None, init_adapters: str | None = None) -> None:
    data_dir = out / "splits" / f"fold-{k}"  # the fold's train/val/test pairs (not in its run directory, which it owns)
    paths = {}
    for name, part in fold_data(bench, assignment, folds, k, seed).items():
        paths[name] = data_dir / f"{name}.jsonl"
        write_jsonl(part.pairs, paths[name])
    print(f"cv fold-{k} ({k + 1} of {folds}): {recipe} on {sum(1 for a in assignment if a != k)} pairs "
          f"(test: {sum(1 for a in assignment if a == k)} pairs)", flush=True)
    fold_overrides = [*(overrides or []), f"output_dir={out / f'fold-{k}'}", f"data.train={paths['train']}",
                      f"data.val={paths['val']}", f"data.test={paths['test']}", *fold_init(init_adapters, k)]
    if launch is None:
        run_recipe(recipe, config, fold_overrides)
        return
    from unconfuse.eval.launch import accelerate_launch

    status = accelerate_launch(f"unconfuse.recipes.{recipe}", launch, ["--config", str(config), *fold_overrides])
    if status == 3:
        raise NonFiniteError(f"fold {k}: training diverged (see {out / f'fold-{k}'})")
    if status:
        raise FoldFailed(f"fold {k}: the launched run exited with status {status} (its error is above)", status)


def fold_init(init_adapters: str | None, k: int) -> list[str]:
    """The override that starts fold ``k`` from fold ``k`` of the cv folder ``init_adapters`` names (none when it
    names a run, or nothing)."""
    if init_adapters and (Path(init_adapters) / "splits").is_dir():
        return [f"init_adapters={Path(init_adapters) / f'fold-{k}'}"]
    return []


class FoldFailed(RuntimeError):
    """A fold's run under ``accelerate launch`` exited with an error (its status is kept)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _collect(recipe: str, cfg: Any, folds: int, benchmark: str, bench: Benchmark, out: Path, seed: int) -> RunResults:
    start = time.time()
    fold_runs = [read_run_results(out / f"fold-{k}") for k in range(folds)]
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
        steps=sum(r.steps for r in fold_runs), best_step=None, best_val=None,
        # the folds' own training and scoring time (run as separate jobs, the cv's wall clock is theirs)
        wall_time_s=sum(r.wall_time_s or 0 for r in fold_runs) + time.time() - start,
        scorer_version=first.scorer_version, prompt_version=first.prompt_version,
        details={"folds": folds, "split_seed": seed, "per_fold": per_fold,
                 "fold_mean": {m: _mean(r[m] for r in per_fold) for m in METRICS},
                 "fold_std": {m: _std(r[m] for r in per_fold) for m in METRICS}},
        retention=_pooled_retention(out, fold_runs))
    write_run_results(out, results)
    return results


def _pooled_retention(out: Path, fold_runs: list[RunResults]) -> dict[str, Any] | None:
    """The folds' retention, pooled (``eval.retention.pooled_retention_block``). Folds measured on one set (an
    explicit ``data.retention``): every fold's model on the same items, the change per item its mean over the folds.
    Folds measured each on its own held-out images (``auto`` on world folds: disjoint items): their records joined,
    each item scored once, by the fold that held its image out. None when the folds measured none."""
    blocks = [r.retention for r in fold_runs]
    if not any(blocks):
        return None
    if not all(blocks) or len({b["mode"] for b in blocks}) > 1:
        raise ValueError(f"{out}: the folds measured retention in different modes, or some not at all; rerun them with one "
                         f"data.retention")
    folders = [out / f"fold-{k}" / "retention" for k in range(len(fold_runs))]
    befores, afters = [read_records(f / "base.jsonl") for f in folders], [read_records(f / "test.jsonl") for f in folders]
    if len({b["fingerprint"] for b in blocks}) == 1:
        return pooled_retention_block(blocks[0]["benchmark"], blocks[0]["fingerprint"], blocks[0]["mode"], befores, afters)
    ids = [{r["id"] if "id" in r else r["image"] for r in records} for records in befores]  # questions; captioned images
    if sum(map(len, ids)) != len(set().union(*ids)):  # some item measured by two folds
        raise ValueError(f"{out}: the folds measured retention on different sets that share items; rerun them with one "
                         f"data.retention, or auto (each fold its own held-out images)")
    joined = hashlib.sha256("".join(b["fingerprint"] for b in blocks).encode()).hexdigest()[:16]
    block = pooled_retention_block(f"per-fold held-out ({len(blocks)} folds)", joined, blocks[0]["mode"],
                                   [[r for records in befores for r in records]], [[r for records in afters for r in records]])
    return {**block, "folds": len(blocks)}


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
    if results.retention:
        block = results.retention
        numbers = block["metrics"][block["headline"]]
        if "folds" in block:  # each fold on its own held-out images
            lines.append(f"retention ({block['benchmark']}, {block['headline']}, {numbers['n']} items, each scored by the "
                         f"fold that held its image out): {numbers['before']:.1f} -> {numbers['after']:.1f}, change "
                         f"{numbers['diff']:+.1f} {fmt_ci(numbers['diff_ci'])}, McNemar p {numbers['mcnemar_p']:.2g}")
        else:
            lines.append(f"retention ({block['benchmark']}, {block['headline']}, every fold's model on the same {numbers['n']} items): "
                         f"{numbers['before']:.1f} -> {numbers['after']:.1f} (folds: "
                         f"{', '.join(f'{v:.1f}' for v in numbers.get('after_per_run', [numbers['after']]))}), change "
                         f"{numbers['diff']:+.1f} {fmt_ci(numbers['diff_ci'])}, sign test p {numbers['mcnemar_p']:.2g}")
    return "\n".join(lines)
