"""``unconfuse demo``, the main job. For now: evaluate the tiny preset models in every mode on a
benchmark of real radiology images (pydicom's), offline, and print the score table. The recipe
issues extend it with training and a base-vs-mitigated comparison."""
from __future__ import annotations

import time
from pathlib import Path

from unconfuse.eval.runner import EvalConfig, run_eval
from unconfuse.eval.sample import write_sample_benchmark
from unconfuse.eval.scorer import score_table

DEMO_RUNS = [
    ("tiny-llava", "greedy"), ("tiny-llava", "prefix"), ("tiny-llava", "mc"),
    ("tiny-qwen2-vl", "greedy"), ("tiny-qwen2-vl", "prefix"),
    ("tiny-clip", "clip"), ("tiny-hf-clip", "clip"),
]


def run_demo(out: str | Path) -> list[tuple[str, dict]]:
    """Evaluate every demo (model, mode) on the sample benchmark; print and return the table rows."""
    out = Path(out)
    start = time.time()
    bench = write_sample_benchmark(out / "benchmark")
    print(f"benchmark: {bench} (6 confusing pairs of real DICOM/PNG radiology images from pydicom)")
    rows = []
    for model, mode in DEMO_RUNS:
        results = run_eval(EvalConfig(model=model, mode=mode, benchmark=str(bench), out=str(out / f"{model}-{mode}"),
                                      progress=False))
        rows.append((f"{model} / {mode}", results))
    print()
    print(score_table(rows))
    print()
    print("Tiny models have random weights: like the MLLMs of the paper, they tend to give both images of a pair")
    print("the same answer (confusion near 100%), which caps set accuracy far below the 25% of random guessing.")
    print(f"Per-run predictions, results.json and report.md are in {out}/ ({time.time() - start:.0f} s)")
    return rows
