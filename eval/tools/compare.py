"""``unconfuse compare``: mitigation strategies side by side, with CIs and significance.

Reads run directories (recipe runs, cv directories, or scored folders such as ``unconfuse eval``
outputs and a run's ``base/``), rescores every run's test predictions on the same benchmark,
and writes ``comparison.md``, ``comparison.csv`` and ``comparison.png``: per run the test set
accuracy, confusion and individual accuracy with bootstrap CIs, the paired difference to the
baseline (bootstrap CI + exact McNemar), per-category set accuracy; runs of one strategy over
several seeds are also grouped (mean, std).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unconfuse.eval.benchmarks import Benchmark, load_benchmark
from unconfuse.eval.folders import owned_folder
from unconfuse.eval.io import atomic_write_text
from unconfuse.eval.runs import RunFormatError, read_kind, read_run_results, read_scored
from unconfuse.eval.scorer import PredictionsError, compare, fmt, fmt_ci, read_predictions, resolve_answers, score
from unconfuse.eval.tracking import start_wandb_run, wandb_mode

METRICS = ("set_accuracy", "confusion", "individual_accuracy")


class CompareError(ValueError):
    """A run directory that cannot be compared; the message names it."""


@dataclass
class RunEntry:
    path: Path
    label: str
    strategy: str
    model: str
    data: str
    seed: int | None
    predictions: Path
    test_data: str | None
    fingerprint: str | None = None  # of the benchmark its predictions were scored on, when recorded
    answers: Any = None
    results: dict[str, Any] | None = None
    retention: dict[str, Any] | None = None  # the run's retention block (results.json), when it measured one


def load_run(path: str | Path) -> RunEntry:
    """A run or cv directory (its run record; test predictions in ``test/``), or a scored folder
    (``unconfuse eval --out``, a run's ``base/``), read through the run format."""
    path = Path(path)
    try:
        kind = read_kind(path)
        if kind == "scored":
            res = read_scored(path)
            strategy = res.get("strategy") or res["model"]
            if res.get("strategy_settings"):  # a training-free strategy: on which model (a base, a trained run)
                strategy = f"{strategy} on {_short_model(res['model'])}"
            entry = RunEntry(path, "", strategy, f"{res['model']} / {res['mode']}", res.get("train_data") or res["benchmark"],
                             res.get("seed"), path / "predictions.jsonl", res["benchmark"], res.get("benchmark_fingerprint"),
                             retention=res.get("retention"))  # an eval's: under its strategy against the plain model
        else:
            run = read_run_results(path)
            strategy = f"{run.strategy} (cv {run.details['folds']} folds)" if run.kind == "cv" else run.strategy
            test = path / "test" / "results.json"
            recorded = json.loads(test.read_text()).get("benchmark_fingerprint") if test.is_file() else None
            entry = RunEntry(path, "", strategy, run.model, run.train_data, run.seed, path / "test" / "predictions.jsonl",
                             run.test_data, recorded, retention=run.retention)
    except RunFormatError as exc:
        raise CompareError(str(exc)) from exc
    if not entry.predictions.exists():
        raise CompareError(f"{path}: no test predictions at {entry.predictions}")
    entry.label = entry.strategy + (f" (seed {entry.seed})" if entry.seed is not None else "")
    return entry


def _short_model(model: str) -> str:
    """A preset's name as it is; a folder by its last three parts (``mllm_sft/checkpoints/best``)."""
    parts = Path(model).parts
    return "/".join(parts[-3:]) if len(parts) > 3 else model


def _benchmark(arg: str | None, entries: list[RunEntry]) -> Benchmark:
    candidates = [arg] if arg else [e.test_data for e in entries if e.test_data]
    if not candidates:
        raise CompareError("none of the runs names its test benchmark; pass --benchmark")
    return load_benchmark(candidates[0])


def _check_same_benchmark(bench: Benchmark, arg: str | None, base: RunEntry, entries: list[RunEntry]) -> None:
    """Every run scored on the benchmark compared on, by content (pair records and images), not only by
    pair ids: two benchmarks may share ids. Runs that did not record a fingerprint are checked by loading
    the benchmark they name now."""
    expected = bench.fingerprint()
    reference = f"--benchmark {arg}" if arg else f"the baseline {base.path} ({base.test_data})"
    for entry in [base, *entries]:
        found = entry.fingerprint
        if found is None and entry.test_data and entry.test_data != (arg or base.test_data):
            found = load_benchmark(entry.test_data).fingerprint()
        if found is not None and found != expected and entry.test_data == (arg or base.test_data):
            raise CompareError(f"{entry.path} was scored on {entry.test_data} as it was then (fingerprint {found}); "
                               f"it has changed since (fingerprint {expected}): rescore the run on it first")
        if found is not None and found != expected:
            raise CompareError(f"{entry.path} was scored on benchmark {entry.test_data} (fingerprint {found}), "
                               f"{reference} is another (fingerprint {expected}); compare needs runs of one benchmark")


def _fmt_ci(res: dict[str, Any], key: str) -> str:
    return f"{fmt(res[key])} {fmt_ci(res['ci'][key])}"


def _csv_number(value: float | None, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)  # undefined (null): an empty cell


def load_scored_runs(runs: list[str | Path], baseline: str | Path, benchmark: str | None = None
                     ) -> tuple[Benchmark, RunEntry, list[RunEntry]]:
    """The benchmark, the baseline and the runs, each with its test answers and scores, checked to be of
    one benchmark and to cover the same pairs (``compare`` and ``atlas`` read runs through this)."""
    base = load_run(baseline)
    entries = [load_run(r) for r in runs]
    bench = _benchmark(benchmark, [base, *entries])
    _check_same_benchmark(bench, benchmark, base, entries)
    ids = {p.id for p in bench.pairs}
    for entry in [base, *entries]:
        try:
            predictions = read_predictions(entry.predictions)
            predicted = {pair_id for pair_id, _ in predictions}
            if predicted != ids:
                raise CompareError(f"{entry.path}: its predictions cover {len(predicted)} pairs, {len(predicted & ids)} of "
                                   f"the {len(ids)} pairs of {bench.name}; compare needs the same pairs in every run")
            entry.answers = resolve_answers(bench.pairs, predictions)
        except PredictionsError as exc:
            raise CompareError(f"{entry.path}: {exc}") from exc
        entry.results = score(bench.pairs, entry.answers)
    return bench, base, entries


def run_compare(runs: list[str | Path], baseline: str | Path, out: str | Path, benchmark: str | None = None,
                title: str = "Mitigation strategies compared", force: bool = False) -> dict[str, Any]:
    """Score every run against the baseline on the same pairs; write comparison.{md,csv,png}."""
    out = Path(out)
    bench, base, entries = load_scored_runs(runs, baseline, benchmark)
    base.label = f"{base.label} [baseline]"
    rows = []
    for entry in [base, *entries]:
        diff = None if entry is base else compare(bench.pairs, base.answers, entry.answers)
        rows.append({"label": entry.label, "path": str(entry.path), "strategy": entry.strategy, "model": entry.model,
                     "data": entry.data, "seed": entry.seed, "results": entry.results, "vs_baseline": diff,
                     "retention": retention_change(entry.retention)})
    groups = _groups(rows[1:])
    categories = sorted({c for row in rows for c in row["results"].get("per_category", {})})
    fingerprint = {"command": "compare", "baseline": str(Path(baseline).resolve()),
                   "runs": [str(Path(r).resolve()) for r in runs], "data": bench.fingerprint()}
    with owned_folder(out, fingerprint, force=force, what="comparison"):
        atomic_write_text(out / "comparison.md", _markdown(title, bench, rows, groups, categories))
        atomic_write_text(out / "comparison.csv", _csv(rows, groups, categories))
        _plot(out / "comparison.png", rows, groups)
    summary = {"benchmark": bench.name, "n_pairs": len(bench.pairs), "rows": rows, "groups": groups}
    summary["wandb"] = _log_wandb(rows, groups, [Path(r) for r in runs], out)
    return summary


RETENTION_ALPHA = 0.05  # a retention drop with McNemar p below this is flagged


def retention_change(block: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline of a run's retention block: what the mitigation cost (after - before, paired, on the
    same held-out items), flagged ``significant_drop`` when it fell with McNemar p < 0.05."""
    if not block:
        return None
    metric = block["headline"]
    numbers = block["metrics"][metric]
    return {"metric": metric, "benchmark": block["benchmark"], "mode": block["mode"], "before": numbers["before"],
            "after": numbers["after"], "after_ci": numbers["after_ci"], "diff": numbers["diff"],
            "diff_ci": numbers["diff_ci"], "mcnemar_p": numbers["mcnemar_p"],
            "significant_drop": numbers["diff"] < 0 and numbers["mcnemar_p"] < RETENTION_ALPHA}


def _retention_cell(change: dict[str, Any] | None) -> str:
    if change is None:
        return "not measured"
    flag = " **significant drop**" if change["significant_drop"] else ""
    return (f"{change['before']:.1f} -> {change['after']:.1f}: {change['diff']:+.1f} "
            f"[{change['diff_ci'][0]:+.1f}, {change['diff_ci'][1]:+.1f}], p {change['mcnemar_p']:.2g}{flag}")


def _groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in seed, grouped: mean and sample std of each metric."""
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["strategy"], row["model"], row["data"]), []).append(row)
    groups = []
    for (strategy, model, data), members in by_key.items():
        if len(members) < 2:
            continue
        group = {"strategy": strategy, "model": model, "data": data, "n_runs": len(members),
                 "seeds": [m["seed"] for m in members]}
        for key in METRICS:
            values = [m["results"][key] for m in members if m["results"][key] is not None]  # undefined ones left out
            group[f"{key}_mean"] = float(np.mean(values)) if values else None
            group[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        diffs = [m["vs_baseline"]["set_accuracy_diff"] for m in members]
        group["set_accuracy_diff_mean"] = float(np.mean(diffs))
        changes = [m["retention"]["diff"] for m in members if m["retention"]]
        group["retention_diff_mean"] = float(np.mean(changes)) if changes else None
        group["retention_diff_std"] = float(np.std(changes, ddof=1)) if len(changes) > 1 else None
        groups.append(group)
    return groups


def _markdown(title: str, bench: Benchmark, rows, groups, categories) -> str:
    lines = [f"# {title}", "", f"Test benchmark `{bench.name}`: {len(bench.pairs)} pairs. 95% percentile bootstrap "
             "CIs over pairs; the difference to the baseline is paired (same pairs), with the exact McNemar "
             "test on per-pair set correctness.", "",
             "| run | model | data | set accuracy | confusion | individual accuracy | set acc. vs baseline [95% CI] | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        res, diff = row["results"], row["vs_baseline"]
        delta = (f"{diff['set_accuracy_diff']:+.1f} [{diff['set_accuracy_diff_ci'][0]:+.1f}, "
                 f"{diff['set_accuracy_diff_ci'][1]:+.1f}]") if diff else ""
        p_value = f"{diff['mcnemar_p']:.2g}" if diff else ""
        lines.append(f"| {row['label']} | {row['model']} | {row['data']} | {_fmt_ci(res, 'set_accuracy')} | "
                     f"{_fmt_ci(res, 'confusion')} | {_fmt_ci(res, 'individual_accuracy')} | {delta} | {p_value} |")
    if any(row["retention"] for row in rows):
        lines += ["", "Gain on pairs and what it cost (retention: the model's general ability on held-out single-image "
                  "questions, before -> after, paired difference [95% CI] and McNemar p; a drop with p < "
                  f"{RETENTION_ALPHA} is flagged):", "",
                  "| run | gain on pairs: set acc. vs baseline [95% CI] | retention metric | retention change |",
                  "|---|---|---|---|"]
        for row in rows[1:]:
            diff, change = row["vs_baseline"], row["retention"]
            gain = (f"{diff['set_accuracy_diff']:+.1f} [{diff['set_accuracy_diff_ci'][0]:+.1f}, "
                    f"{diff['set_accuracy_diff_ci'][1]:+.1f}], p {diff['mcnemar_p']:.2g}")
            metric = f"{change['metric']} ({change['benchmark']}, {change['mode']})" if change else ""
            lines.append(f"| {row['label']} | {gain} | {metric} | {_retention_cell(change)} |")
    if groups:
        lines += ["", "Seeds grouped (mean ± sample std over runs):", "",
                  "| strategy | model | runs | set accuracy | confusion | individual accuracy | mean diff vs baseline "
                  "| retention change |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in groups:
            lines.append(f"| {g['strategy']} | {g['model']} | {g['n_runs']} | "
                         + " | ".join(f"{fmt(g[f'{k}_mean'])} ± {fmt(g[f'{k}_std'])}" for k in METRICS)
                         + f" | {g['set_accuracy_diff_mean']:+.1f} | "
                         + (f"{g['retention_diff_mean']:+.1f} ± {fmt(g['retention_diff_std'])}" if g["retention_diff_mean"] is not None else "")
                         + " |")
    if categories:
        lines += ["", "Set accuracy per category:", "", "| run | " + " | ".join(categories) + " |",
                  "|---|" + "---|" * len(categories)]
        for row in rows:
            per = row["results"].get("per_category", {})
            lines.append(f"| {row['label']} | " + " | ".join(
                f"{per[c]['set_accuracy']:.1f}" if c in per else "" for c in categories) + " |")
    lines += ["", "![set accuracy vs confusion, and vs retention](comparison.png)", ""]
    return "\n".join(lines)


def _csv(rows, groups, categories) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["row", "label", "strategy", "model", "data", "seed", "runs"]
    for key in METRICS:
        header += [key, f"{key}_ci_low", f"{key}_ci_high", f"{key}_std"]
    header += ["set_accuracy_diff", "set_accuracy_diff_ci_low", "set_accuracy_diff_ci_high", "mcnemar_p",
               "retention_metric", "retention_before", "retention_after", "retention_diff", "retention_diff_ci_low",
               "retention_diff_ci_high", "retention_mcnemar_p", "retention_significant_drop", "path"]
    header += [f"set_accuracy[{c}]" for c in categories]
    writer.writerow(header)
    for row in rows:
        res, diff = row["results"], row["vs_baseline"]
        line = ["baseline" if diff is None else "run", row["label"], row["strategy"], row["model"], row["data"],
                "" if row["seed"] is None else row["seed"], 1]
        for key in METRICS:
            bounds = res["ci"][key] or (None, None)
            line += [_csv_number(res[key]), _csv_number(bounds[0]), _csv_number(bounds[1]), ""]
        line += ([f"{diff['set_accuracy_diff']:.4f}", f"{diff['set_accuracy_diff_ci'][0]:.4f}",
                  f"{diff['set_accuracy_diff_ci'][1]:.4f}", f"{diff['mcnemar_p']:.6g}"] if diff else ["", "", "", ""])
        change = row["retention"]
        line += ([change["metric"], f"{change['before']:.4f}", f"{change['after']:.4f}", f"{change['diff']:.4f}",
                  f"{change['diff_ci'][0]:.4f}", f"{change['diff_ci'][1]:.4f}", f"{change['mcnemar_p']:.6g}",
                  str(change["significant_drop"]).lower()] if change else [""] * 8)
        line.append(row["path"])
        per = res.get("per_category", {})
        line += [f"{per[c]['set_accuracy']:.4f}" if c in per else "" for c in categories]
        writer.writerow(line)
    for g in groups:
        line = ["group", f"{g['strategy']} ({g['n_runs']} seeds)", g["strategy"], g["model"], g["data"],
                " ".join(str(s) for s in g["seeds"]), g["n_runs"]]
        for key in METRICS:
            line += [_csv_number(g[f"{key}_mean"]), "", "", _csv_number(g[f"{key}_std"])]
        line += [f"{g['set_accuracy_diff_mean']:.4f}", "", "", "", "", "", "",
                 _csv_number(g["retention_diff_mean"]), "", "", "", "", ""] + [""] * len(categories)
        writer.writerow(line)
    return buffer.getvalue()


def _plot(path: Path, rows, groups) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_retention = [row for row in rows if row["retention"]]
    fig, axes = plt.subplots(1, 2 if with_retention else 1, figsize=(13 if with_retention else 7, 5), squeeze=False)
    ax = axes[0][0]
    colors = {row["label"]: f"C{i}" for i, row in enumerate(rows)}  # one colour per run in both panels
    for row in rows:
        res = row["results"]
        if res["confusion"] is None:  # undefined: no point to place
            continue
        x, y = res["confusion"], res["set_accuracy"]
        xerr = [[x - res["ci"]["confusion"][0]], [res["ci"]["confusion"][1] - x]]
        yerr = [[y - res["ci"]["set_accuracy"][0]], [res["ci"]["set_accuracy"][1] - y]]
        marker = "s" if row["vs_baseline"] is None else "o"
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, capsize=3, alpha=0.8, label=row["label"],
                    color=colors[row["label"]])
        ax.annotate(row["strategy"], (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    for g in (g for g in groups if g["confusion_mean"] is not None and g["confusion_std"] is not None):
        ax.errorbar(g["confusion_mean"], g["set_accuracy_mean"], xerr=g["confusion_std"], yerr=g["set_accuracy_std"],
                    fmt="D", ms=9, capsize=5, mfc="none", label=f"{g['strategy']} (mean ± std, {g['n_runs']} seeds)")
    ax.axhline(25, color="red", ls=":", lw=1, label="random guessing (25%)")
    ax.set_xlabel("confusion (%), lower is better")
    ax.set_ylabel("set accuracy (%), higher is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if with_retention:
        _plot_retention(axes[0][1], rows[0], with_retention, colors)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_retention(ax, baseline: dict[str, Any], rows: list[dict[str, Any]], colors: dict[str, str]) -> None:
    """Set accuracy against retention: what each run gained on the pairs and what it kept of the rest (the base
    model at the runs' shared "before"). Up and to the right is better; left of the base is a cost."""
    before = rows[0]["retention"]["before"]
    ax.plot(before, baseline["results"]["set_accuracy"], "s", ms=8, color="black", label=f"{baseline['label']} (before)")
    for row in rows:
        change, res = row["retention"], row["results"]
        x, y = change["after"], res["set_accuracy"]
        xerr = [[x - change["after_ci"][0]], [change["after_ci"][1] - x]]
        yerr = [[y - res["ci"]["set_accuracy"][0]], [res["ci"]["set_accuracy"][1] - y]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="X" if change["significant_drop"] else "o", capsize=3, alpha=0.8,
                    color=colors[row["label"]],
                    label=row["label"] + (" (significant retention drop)" if change["significant_drop"] else ""))
    ax.axvline(before, color="black", ls=":", lw=1)
    ax.axhline(25, color="red", ls=":", lw=1)
    metric = rows[0]["retention"]["metric"]
    ax.set_xlabel(f"retention: {metric} on held-out items (%), higher is better")
    ax.set_ylabel("set accuracy (%), higher is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _log_wandb(rows, groups, run_dirs: list[Path], out: Path) -> dict[str, Any]:
    """Online: log the table to the W&B project. Otherwise: where the offline runs are, to sync."""
    offline = sorted(str(p) for d in run_dirs for p in d.glob("**/wandb/offline-run-*"))
    if wandb_mode() != "online":
        return {"logged": False, "offline_runs": offline}
    import wandb

    run = start_wandb_run(out.name, str(out), job_type="compare")
    columns = ["run", "strategy", "model", "data", "seed", *METRICS, "set_accuracy_diff", "mcnemar_p", "retention_diff",
               "retention_mcnemar_p"]
    table = wandb.Table(columns=columns, data=[
        [r["label"], r["strategy"], r["model"], r["data"], r["seed"], *(r["results"][k] for k in METRICS),
         r["vs_baseline"]["set_accuracy_diff"] if r["vs_baseline"] else None,
         r["vs_baseline"]["mcnemar_p"] if r["vs_baseline"] else None,
         r["retention"]["diff"] if r["retention"] else None,
         r["retention"]["mcnemar_p"] if r["retention"] else None] for r in rows])
    run.log({"comparison": table, "comparison_plot": wandb.Image(str(out / "comparison.png"))})
    url = run.url
    run.finish()
    return {"logged": True, "url": url, "offline_runs": offline}


def compare_summary(summary: dict[str, Any], out: Path) -> str:
    lines = [f"{'run':<44} {'set acc [95% CI]':>22} {'confusion':>10} {'vs baseline':>12} {'McNemar p':>10}  retention change"]
    for row in summary["rows"]:
        res, diff, change = row["results"], row["vs_baseline"], row.get("retention")
        lines.append(f"{row['label'][:44]:<44} {res['set_accuracy']:>6.1f} {fmt_ci(res['ci']['set_accuracy']):>14} "
                     f"{fmt(res['confusion']):>10} "
                     + (f"{diff['set_accuracy_diff']:>+12.1f} {diff['mcnemar_p']:>10.2g}" if diff else f"{'':>12} {'':>10}")
                     + (f"  {_retention_cell(change).replace('**', '')}" if change else ""))
    for g in summary["groups"]:
        lines.append(f"{g['strategy']} over {g['n_runs']} seeds: set accuracy {fmt(g['set_accuracy_mean'])} ± "
                     f"{fmt(g['set_accuracy_std'])}, confusion {fmt(g['confusion_mean'])} ± {fmt(g['confusion_std'])}")
    wb = summary["wandb"]
    if wb["logged"]:
        lines.append(f"logged to W&B: {wb['url']}")
    elif wb["offline_runs"]:
        lines.append("W&B is offline; the runs' offline logs are in: " + ", ".join(wb["offline_runs"])
                     + " (upload each with `wandb sync DIR`)")
    lines.append(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")
    return "\n".join(lines)
