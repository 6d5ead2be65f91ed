"""``unconfuse demo``, the main job, in two acts on the embedded world, each recipe in a setting that forgets
("old") beside the shipped one that keeps what the model knew. Act 1: the confused base encoder, clip_hardneg
trained on held-out confusing pairs (the MediConfusion scorer as the validation loop) without and with replay
of general data, and the no-replay run interpolated toward its base (WiSE-FT, chosen on the validation side).
Act 2: the confused tiny LLaVA, mllm_sft at lr 1e-3 and as it ships (lr 3e-4, anchored to the base), and
mllm_grpo rewarding the set-accuracy event, started from the shipped sft run. The test split, scored by ``unconfuse compare``, shows
whether each helped and what it cost (retention: the world's modality and body-part questions on the test
images, before and after), on one set-accuracy vs retention plot; the failure atlas of each act shows the
pairs each run fixed or broke."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from unconfuse.cli.jobs import Job, run_jobs
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.home import config_dir
from unconfuse.eval.io import atomic_write_text
from unconfuse.eval.runner import EvalConfig, run_eval
from unconfuse.eval.scorer import fmt, fmt_ci, score_table
from unconfuse.eval.world import default_world, prepare
from unconfuse.recipes import run_recipe

CONFIGS = config_dir()
CONFIG = CONFIGS / "clip_hardneg" / "tiny.yaml"
MLLM_BASE_RUNS = [("tiny-llava-base", "greedy"), ("tiny-llava-base", "prefix")]
# Each act shows the recipe in a setting that forgets ("old": no replay; lr 1e-3 without the anchor) beside the
# shipped, retaining one. Act 1: (label, run folder, overrides, step cost) of configs/clip_hardneg/tiny.yaml, ENCODER_STEPS
# each, and the no-replay run interpolated toward its base (`unconfuse interpolate`: the alpha with the best val set
# accuracy among those within 5 points of the base's val retention).
# Act 2: (label, recipe, run folder, training steps, overrides, the run it starts from), tested in greedy mode, the
# validation mode; GRPO samples 4 rollouts per image and starts from the retaining sft run's selected adapters.
# Step counts are the demo's, chosen so that the whole demo takes under 5 minutes from an empty cache on 2 CPU cores.
ENCODER_STEPS = 300
STRATEGIES = [("clip_hardneg (old: no replay)", "clip_hardneg-old", ["data.replay=none"], "clip_hardneg"),
              ("clip_hardneg (replay)", "clip_hardneg", [], "clip_hardneg+replay")]
INTERPOLATED = ("clip_hardneg (old) interpolated", "clip_hardneg-old-wise", "0,0.2,0.4,0.6,0.8,1", 5.0)
MLLM_STRATEGIES = [("mllm_sft (old: lr 1e-3)", "mllm_sft", "mllm_sft-old", 300, ["train.learning_rate=1e-3",
                                                                                      "lora.anchor_weight=0",
                                                                                      "strategy=sft-lr1e-3"], None),
                   ("mllm_sft", "mllm_sft", "mllm_sft", 600, [], None),  # the shipped config's steps: the anchor
                   # slows the gain (300 steps: +11.2 on seed 0, 600: +31.2)
                   ("mllm_grpo (after sft)", "mllm_grpo", "mllm_grpo", 150, ["grpo.num_generations=4"], "mllm_sft")]


def _ci(results: dict[str, Any], key: str) -> str:
    return f"{fmt(results[key])} {fmt_ci(results['ci'][key])}"


def _table(base_name: str, names: list[str], summary: dict[str, Any]) -> list[str]:
    """The report table of one act, from ``unconfuse compare``'s rows (baseline first, then the runs): the gain
    on the pairs and, beside it, the retention change (what the run cost on held-out questions)."""
    lines = ["| model | set accuracy | confusion | individual accuracy | set acc. vs base [95% CI] | McNemar p "
             "| retention before -> after [95% CI of change], p |",
             "|---|---|---|---|---|---|---|"]
    for name, row in zip([base_name, *names], summary["rows"]):
        res, diff, change = row["results"], row["vs_baseline"], row.get("retention")
        delta = f"{diff['set_accuracy_diff']:+.1f} [{diff['set_accuracy_diff_ci'][0]:+.1f}, {diff['set_accuracy_diff_ci'][1]:+.1f}]" if diff else ""
        p_value = f"{diff['mcnemar_p']:.2g}" if diff else ""
        kept = (f"{change['metric']} {change['before']:.1f} -> {change['after']:.1f} "
                f"[{change['diff_ci'][0]:+.1f}, {change['diff_ci'][1]:+.1f}], p {change['mcnemar_p']:.2g}"
                + (" (significant drop)" if change["significant_drop"] else "")) if change else ""
        lines.append(f"| {name} | {_ci(res, 'set_accuracy')} | {_ci(res, 'confusion')} | {_ci(res, 'individual_accuracy')} "
                     f"| {delta} | {p_value} | {kept} |")
    return lines


# Seconds on one core of a 2-core machine (a base model's build, a recipe's training step, an interpolation, as
# the demo's own runs took), only to order the jobs: the ready job heading the longest chain of work starts first.
JOB_SECONDS = {"tiny-clip-base": 71.0, "tiny-llava-base": 26.0, "clip_hardneg": 0.14, "clip_hardneg+replay": 0.28,
               "mllm_sft": 0.19, "mllm_dpo": 0.49, "mllm_grpo": 0.39, "interpolate": 2.0}


def run_demo(out: str | Path, seed: int = 0, mllm_steps: int | None = None, workers: int | None = None) -> dict[str, Any]:
    """Act 1: the encoder, base vs clip_hardneg old (no replay) vs clip_hardneg with replay vs the old run
    interpolated. Act 2: the MLLM, base vs mllm_sft old vs mllm_sft vs mllm_grpo after sft. Both on the world's test pairs,
    compared with ``unconfuse compare`` (whose tables the report shows, with each run's retention change),
    and ending in a failure atlas per act. ``mllm_steps`` replaces the act-2 step counts; 0 skips act 2.
    The base models' builds and the runs are jobs that ``workers`` processes take in turn (default: 2 when
    the machine has 2 cores or more), each on its share of the cores; 1 runs them one after another here."""
    import os

    from unconfuse.eval.tools.atlas import atlas_summary, write_atlas
    from unconfuse.eval.tools.compare import compare_summary, run_compare

    out = Path(out)
    start = time.time()
    os.environ.setdefault("WANDB_SILENT", "true")  # the demo says where the offline runs are, once
    workers = workers or min(2, os.cpu_count() or 1)
    print("building or reusing the embedded world ...", flush=True)
    world = default_world()
    test = load_benchmark(world.root / "test")
    n_train, n_val = len(load_benchmark(world.root / "train").pairs), len(load_benchmark(world.root / "val").pairs)
    mllm_base = {mode: out / f"{m}-{mode}" for m, mode in MLLM_BASE_RUNS}
    base_model = MLLM_BASE_RUNS[0][0]
    jobs = [Job("tiny-clip-base", prepare, (["tiny-clip-base"],), cost=JOB_SECONDS["tiny-clip-base"],
                what="building the base encoder (pretraining on the world corpus; cached)"),
            Job(base_model, _base_mllm, (base_model, [mode for _, mode in MLLM_BASE_RUNS], str(world.root / "test"),
                                        [str(mllm_base[mode]) for _, mode in MLLM_BASE_RUNS]),
                cost=JOB_SECONDS[base_model], what="building the base MLLM (cached) and scoring it on the test pairs")]
    runs: dict[str, dict[str, Any]] = {}
    for name, folder, overrides, cost_key in STRATEGIES:
        run_dir = out / folder
        runs[name] = {"dir": run_dir}
        jobs.append(Job(name, run_recipe, ("clip_hardneg", str(CONFIG), [
            *overrides, f"output_dir={run_dir}", f"train.seed={seed}", f"train.max_steps={ENCODER_STEPS}"]),
            after=("tiny-clip-base",), cost=ENCODER_STEPS * JOB_SECONDS[cost_key],
            what=f"training tiny-clip-base for {ENCODER_STEPS} steps on {n_train} train pairs (validation: {n_val} val pairs)"))
    name, folder, alphas, floor = INTERPOLATED
    old_name = STRATEGIES[0][0]
    runs[name] = {"dir": out / folder}
    jobs.append(Job(name, _interpolate, (str(runs[old_name]["dir"]), alphas, str(out / folder), floor), after=(old_name,),
                    cost=JOB_SECONDS["interpolate"], what=f"interpolating {old_name} toward its base (alphas {alphas}; "
                                                          f"the best on val within {floor:g} points of the base's val retention)"))
    mllm_runs: dict[str, dict[str, Any]] = {}
    if mllm_steps != 0:
        folders = {name: folder for name, _, folder, *_ in MLLM_STRATEGIES}
        for name, recipe, folder, default_steps, overrides, init in MLLM_STRATEGIES:
            n_steps = mllm_steps or default_steps
            run_dir = out / folder
            mllm_runs[name] = {"dir": run_dir}
            start_from = [f"init_adapters={out / folders[init]}"] if init else []
            jobs.append(Job(name, run_recipe, (recipe, str(CONFIGS / recipe / "tiny.yaml"), [
                f"output_dir={run_dir}", f"train.seed={seed}", f"train.max_steps={n_steps}",
                f"train.eval_steps={max(1, n_steps // 3)}", f"train.save_steps={n_steps}", "test_modes=[greedy]",
                *overrides, *start_from]),
                after=(base_model, *([init] if init else [])), cost=n_steps * JOB_SECONDS[recipe],
                what=f"training {base_model} for {n_steps} steps on {n_train} train pairs" + (f", from {init}" if init else "")))
    done = run_jobs(jobs, workers, start=start)
    mllm_rows = [(f"{m} / {mode}", res) for (m, mode), res in zip(MLLM_BASE_RUNS, done[base_model])]
    for name, run in {**runs, **mllm_runs}.items():
        run["results"] = done[name]

    print(f"[{time.time() - start:4.0f} s] comparing on the test pairs", flush=True)
    first = next(iter(runs.values()))
    acts = {"compare-encoder": ("tiny-clip-base (base)", runs, first["dir"] / "base")}
    if mllm_runs:
        acts["compare-mllm"] = ("tiny-llava-base / greedy (base)", mllm_runs, mllm_base["greedy"])
    summaries = {}
    for folder, (_, act_runs, baseline) in acts.items():
        dirs = [r["dir"] for r in act_runs.values()]
        summaries[folder] = run_compare(dirs, baseline, out / folder, title=f"unconfuse demo: {folder}")
    print(f"[{time.time() - start:4.0f} s] writing the failure atlas of each act", flush=True)
    atlases = {}
    for folder, (base_name, act_runs, baseline) in acts.items():
        name = folder.replace("compare-", "atlas-")
        atlases[name] = write_atlas([r["dir"] for r in act_runs.values()], out / name, baseline=baseline,
                                    labels=list(act_runs))

    lines = [f"# unconfuse demo: confusing pairs on the embedded world (seed {seed})", "",
             f"World `{world.root}`: {world.manifest['counts']['pairs']} pairs on real radiology images. "
             f"Test: {len(test.pairs)} pairs, never used for selection (95% bootstrap CIs).", "",
             "## Act 1: the vision encoder", "", *_table(acts["compare-encoder"][0], list(runs), summaries["compare-encoder"])]
    if mllm_runs:
        step_note = ", ".join(f"{n} {r['results'].steps} steps" for n, r in mllm_runs.items())
        lines += ["", f"## Act 2: the MLLM (greedy mode; {step_note})", "",
                  *_table(acts["compare-mllm"][0], list(mllm_runs), summaries["compare-mllm"]),
                  "", f"Base MLLM in prefix mode: {_ci(mllm_rows[1][1], 'set_accuracy')} set accuracy, "
                  f"{_ci(mllm_rows[1][1], 'confusion')} confusion."]
    else:
        lines += ["", "Base MLLM on the same pairs (no recipe run):", "", "| model / mode | set accuracy | confusion |", "|---|---|---|"]
        lines += [f"| {name} | {_ci(res, 'set_accuracy')} | {_ci(res, 'confusion')} |" for name, res in mllm_rows]
    all_runs = {**runs, **mllm_runs}
    trained = {n: r for n, r in all_runs.items() if n != INTERPOLATED[0]}  # an interpolation has no training curve
    plot = plot_validation(out / "validation.png", {n: r["dir"] for n, r in trained.items()},
                           {n: r["results"] for n, r in trained.items()})
    pareto = runs[INTERPOLATED[0]]["dir"] / "pareto.png"
    lines += ["", "Gain against what it costs, every run with 95% CIs: "
              + ", ".join(f"[{name}]({name}/comparison.png)" for name in acts)
              + "; the no-replay encoder run interpolated toward its base, per alpha on the validation side: "
                f"[pareto.png]({pareto.relative_to(out)}).", "",
              "![gain and retention](compare-encoder/comparison.png)", "",
              f"![validation curves]({plot.name})", "",
              "Comparisons (`unconfuse compare`, with per-category tables and plots): "
              + ", ".join(f"[{name}]({name}/comparison.md)" for name in acts), "",
              "Failure atlases (one card per test pair: both images, every run's answers, fixed / broken / still "
              "confused / right): " + ", ".join(f"[{name}]({name}/index.html)" for name in atlases), "",
              f"Run directories: {', '.join(str(r['dir']) for r in all_runs.values())}."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print()
    rows = [("tiny-clip-base (base)", first["results"].base)] + [(n, r["results"].final) for n, r in runs.items()]
    print(score_table(rows + mllm_rows + [(n, r["results"].final) for n, r in mllm_runs.items()]))
    print()
    comparisons = {}
    for folder, (_, act_runs, _) in acts.items():
        for name, row in zip(act_runs, summaries[folder]["rows"][1:]):
            diff = comparisons[name] = row["vs_baseline"]
            print(f"{name}: set accuracy {diff['set_accuracy_diff']:+.1f} points vs base, 95% CI "
                  f"[{diff['set_accuracy_diff_ci'][0]:+.1f}, {diff['set_accuracy_diff_ci'][1]:+.1f}], McNemar p = {diff['mcnemar_p']:.2g}")
    for folder, (_, act_runs, baseline) in acts.items():
        print(f"\n$ unconfuse compare {' '.join(str(r['dir']) for r in act_runs.values())} --baseline {baseline} --out {out / folder}")
        print(compare_summary(summaries[folder], out / folder))
    for name, index in atlases.items():
        print(f"\n$ unconfuse atlas ... --out {index.parent}")
        print(atlas_summary(json.loads((index.parent / "atlas.json").read_text()), index))
    print(f"\nreport: {out / 'report.md'}, plot: {plot} ({time.time() - start:.0f} s)")
    return {"rows": rows, "comparisons": comparisons, "runs": runs, "mllm_runs": mllm_runs, "summaries": summaries,
            "atlases": atlases, "seconds": time.time() - start}


def _interpolate(run_dir: str, alphas: str, out: str, floor: float):
    """``unconfuse interpolate RUN --alphas ... --out OUT --selection set_accuracy_with_retention_floor
    --retention-floor FLOOR``; the interpolated run's record."""
    from unconfuse.eval.runs import read_run_results

    from .interpolate import interpolate, parse_alphas

    return read_run_results(interpolate(run_dir, parse_alphas(alphas), out, "set_accuracy_with_retention_floor", floor))


def _base_mllm(model: str, modes: list[str], benchmark: str, outs: list[str]) -> list[dict[str, Any]]:
    """Build the base MLLM (once; cached) and score it on ``benchmark`` in each mode."""
    prepare(models=[model])
    return [run_eval(EvalConfig(model=model, mode=mode, benchmark=benchmark, out=out, progress=False))
            for mode, out in zip(modes, outs)]


def plot_validation(path: Path, run_dirs: dict[str, Path], results: dict[str, Any]) -> Path:
    """Validation set accuracy and confusion over steps per strategy, with the selected checkpoint's
    test score (star) and each run's base test score (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, run_dir in run_dirs.items():
        history = [json.loads(line) for line in (run_dir / "val_history.jsonl").read_text().splitlines()]
        steps = [h["step"] for h in history]
        for ax, key in zip(axes, ("set_accuracy", "confusion")):
            line, = ax.plot(steps, [math.nan if h[key] is None else h[key] for h in history], marker="o", ms=3,
                            label=f"{name} (val)")
            if results[name].final[key] is not None:  # undefined (no pair with two valid answers): not drawn
                ax.scatter([results[name].best_step], [results[name].final[key]], marker="*", s=120, color=line.get_color(),
                           label=f"{name} (test, selected)")
    seen_bases = set()
    for name in run_dirs:
        base, model = results[name].base, results[name].model
        if model in seen_bases:
            continue
        seen_bases.add(model)
        for ax, key in zip(axes, ("set_accuracy", "confusion")):
            if base[key] is not None:
                ax.axhline(base[key], color="gray", ls="--", lw=1, label=f"{model} base (test)")
    for ax, key in zip(axes, ("set_accuracy", "confusion")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
        ax.grid(alpha=0.3)
    axes[0].axhline(25, color="red", ls=":", label="random guessing")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
