"""``unconfuse demo``, the main job: the embedded world's base encoder is confused; clip_hardneg
trains it on held-out confusing pairs, with the MediConfusion scorer as the validation loop; the
test split shows whether it helped, against plain fine-tuning on the same pairs."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from unconfuse.eval.io import atomic_write_text
from unconfuse.eval.pairs import load_benchmark
from unconfuse.eval.runner import EvalConfig, run_eval
from unconfuse.eval.scorer import compare, read_predictions, resolve_answers, score_table
from unconfuse.eval.world import default_world

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip_hardneg" / "tiny.yaml"
MLLM_BASE_RUNS = [("tiny-llava-base", "greedy"), ("tiny-llava-base", "prefix")]
STRATEGIES = [("clip_hardneg", []), ("clip-ft (hardneg_weight 0)", ["loss.hardneg_weight=0"])]


def _answers(bench, path: Path):
    return resolve_answers(bench.pairs, read_predictions(path))


def _ci(results: dict[str, Any], key: str) -> str:
    lo, hi = results["ci"][key]
    return f"{results[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def run_demo(out: str | Path, seed: int = 0) -> dict[str, Any]:
    """Base vs clip_hardneg vs plain fine-tuning on the world's test pairs; prints and writes the report."""
    from unconfuse.recipes.clip_hardneg import ClipHardNegConfig, main as train_clip
    from unconfuse.train.config import load_config

    import os

    out = Path(out)
    start = time.time()
    os.environ.setdefault("WANDB_SILENT", "true")  # the demo says where the offline runs are, once
    print("1/4 building or reusing the embedded world and its base models (first time: about a minute) ...", flush=True)
    world = default_world()
    test = load_benchmark(world.root / "test")
    mllm_rows = [(f"{m} / {mode}", run_eval(EvalConfig(model=m, mode=mode, benchmark=str(world.root / "test"),
                                                       out=str(out / f"{m}-{mode}"), progress=False)))
                 for m, mode in MLLM_BASE_RUNS]

    runs: dict[str, dict[str, Any]] = {}
    for i, (name, overrides) in enumerate(STRATEGIES, start=2):
        print(f"{i}/4 training {name} on {len(load_benchmark(world.root / 'train').pairs)} train pairs "
              f"(validation: {len(load_benchmark(world.root / 'val').pairs)} val pairs) ...", flush=True)
        run_dir = out / name.split(" ")[0]
        cfg = load_config(ClipHardNegConfig, CONFIG, [*overrides, f"output_dir={run_dir}", f"train.seed={seed}"])
        runs[name] = {"dir": run_dir, "results": train_clip(cfg)}

    print("4/4 comparing on the test pairs", flush=True)
    first = next(iter(runs.values()))
    base = first["results"]["base"]
    base_answers = _answers(test, first["dir"] / "base" / "predictions.jsonl")
    rows = [("tiny-clip-base (base)", base)] + [(name, r["results"]["final"]) for name, r in runs.items()]
    comparisons = {name: compare(test.pairs, base_answers, _answers(test, r["dir"] / "test" / "predictions.jsonl"))
                   for name, r in runs.items()}
    lines = [f"# unconfuse demo: confusing pairs on the embedded world (seed {seed})", "",
             f"World `{world.root}`: {world.manifest['counts']['pairs']} pairs on real radiology images. "
             f"Test: {len(test.pairs)} pairs, never used for selection (95% bootstrap CIs).", "",
             "| model | set accuracy | confusion | individual accuracy | set acc. vs base [95% CI] | McNemar p |",
             "|---|---|---|---|---|---|"]
    for name, res in rows:
        diff = comparisons.get(name)
        delta = f"{diff['set_accuracy_diff']:+.1f} [{diff['set_accuracy_diff_ci'][0]:+.1f}, {diff['set_accuracy_diff_ci'][1]:+.1f}]" if diff else ""
        p_value = f"{diff['mcnemar_p']:.2g}" if diff else ""
        lines.append(f"| {name} | {_ci(res, 'set_accuracy')} | {_ci(res, 'confusion')} | {_ci(res, 'individual_accuracy')} "
                     f"| {delta} | {p_value} |")
    lines += ["", "Base MLLM on the same pairs (no recipe yet):", "",
              "| model / mode | set accuracy | confusion |", "|---|---|---|"]
    lines += [f"| {name} | {_ci(res, 'set_accuracy')} | {_ci(res, 'confusion')} |" for name, res in mllm_rows]
    plot = plot_validation(out / "validation.png", {n: r["dir"] for n, r in runs.items()}, base, {n: r["results"] for n, r in runs.items()})
    lines += ["", f"![validation curves]({plot.name})", "", f"Run directories: {', '.join(str(r['dir']) for r in runs.values())}."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print()
    print(score_table(rows + mllm_rows))
    print()
    for name, diff in comparisons.items():
        print(f"{name}: set accuracy {diff['set_accuracy_diff']:+.1f} points vs base, 95% CI "
              f"[{diff['set_accuracy_diff_ci'][0]:+.1f}, {diff['set_accuracy_diff_ci'][1]:+.1f}], McNemar p = {diff['mcnemar_p']:.2g}")
    wandb_dirs = sorted(str(p) for r in runs.values() for p in (r["dir"] / "wandb").glob("offline-run-*"))
    if wandb_dirs:
        print(f"offline W&B runs (upload with `wandb sync DIR`): {', '.join(wandb_dirs)}")
    print(f"\nreport: {out / 'report.md'}, plot: {plot} ({time.time() - start:.0f} s)")
    return {"rows": rows, "comparisons": comparisons, "runs": runs}


def plot_validation(path: Path, run_dirs: dict[str, Path], base: dict[str, Any], results: dict[str, Any]) -> Path:
    """Validation set accuracy and confusion over steps per strategy, with base and final test points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, run_dir in run_dirs.items():
        history = [json.loads(line) for line in (run_dir / "val_history.jsonl").read_text().splitlines()]
        steps = [h["step"] for h in history]
        for ax, key in zip(axes, ("set_accuracy", "confusion")):
            line, = ax.plot(steps, [h[key] for h in history], marker="o", ms=3, label=f"{name} (val)")
            ax.scatter([results[name]["best_step"]], [results[name]["final"][key]], marker="*", s=120, color=line.get_color(),
                       label=f"{name} (test, selected)")
    for ax, key in zip(axes, ("set_accuracy", "confusion")):
        ax.axhline(base[key], color="gray", ls="--", label="base (test)")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
        ax.grid(alpha=0.3)
    axes[0].axhline(25, color="red", ls=":", label="random guessing")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
