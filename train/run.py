"""What every recipe run shares: data resolution, the run directory, the leakage audit, W&B."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from unconfuse.eval.io import atomic_write_json, sha256_file
from unconfuse.eval.pairs import Benchmark, load_benchmark


class LeakageError(RuntimeError):
    """Training images appear in the validation or test pairs."""


def resolve_data(arg: str) -> Benchmark:
    """A benchmark argument (``world:<split>`` is the default embedded world's split)."""
    return load_benchmark(arg)


def launch_settings() -> dict[str, Any]:
    """TrainingArguments settings for how this process was launched (plain, DDP, or DeepSpeed via
    accelerate). On CPU + DeepSpeed, accelerate leaves the process group unset: create it with
    gloo here and tell the Trainer to use it (``use_configured_state``)."""
    import torch

    deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else None
    cpu = not torch.cuda.is_available()
    if deepspeed and cpu:
        from accelerate import PartialState

        PartialState(backend="gloo")
    return {"deepspeed": deepspeed, "use_cpu": cpu,
            "accelerator_config": {"use_configured_state": True} if deepspeed and cpu else None}


def default_output_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def leakage_audit(train: Benchmark, others: dict[str, Benchmark]) -> dict[str, Any]:
    """Training images (by resolved path and by content sha256) found in the other splits."""
    def images(bench: Benchmark) -> dict[str, str]:
        return {str(bench.resolve_image(ref).resolve()): ref for ref in bench.unique_images()}

    train_paths = images(train)
    train_hashes = {sha256_file(p): p for p in train_paths}
    report: dict[str, Any] = {"train_images": len(train_paths), "splits": {}}
    for name, bench in others.items():
        paths = images(bench)
        by_id = sorted(set(paths) & set(train_paths))
        by_hash = sorted(p for p in paths if sha256_file(p) in train_hashes and p not in train_paths)
        report["splits"][name] = {"images": len(paths), "shared_by_id": by_id, "shared_by_content": by_hash}
    report["leak"] = any(v["shared_by_id"] or v["shared_by_content"] for v in report["splits"].values())
    return report


def check_leakage(run_dir: Path, train: Benchmark, others: dict[str, Benchmark], allow: bool) -> dict[str, Any]:
    """Write ``leakage.json``; abort before training on a leak unless ``allow``."""
    report = leakage_audit(train, others)
    report["allowed"] = allow
    atomic_write_json(run_dir / "leakage.json", report)
    if report["leak"] and not allow:
        shared = {k: len(v["shared_by_id"]) + len(v["shared_by_content"]) for k, v in report["splits"].items()}
        raise LeakageError(f"training images appear in other splits {shared}; see {run_dir / 'leakage.json'} "
                           "(set allow_leakage: true to train anyway)")
    return report


def write_scored(run_dir: Path, name: str, records: list[dict[str, Any]], results: dict[str, Any], title: str) -> None:
    """``run_dir/name/`` with predictions.jsonl, results.json and report.md (atomic writes)."""
    from unconfuse.eval.io import atomic_write_text
    from unconfuse.eval.scorer import render_report

    folder = run_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(folder / "results.json", results)
    atomic_write_text(folder / "report.md", render_report(results, title=title))


def setup_wandb(report_to: str, run_dir: Path, config: dict[str, Any], strategy: str, tags: list[str]):
    """Start a W&B run (project ``unconfuse``, grouped by strategy) or return None.

    Without an API key (and no WANDB_MODE set) the run is offline: it never blocks on the
    network. API keys are read by wandb from the environment and never written by us.
    """
    if report_to != "wandb" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_PROJECT", "unconfuse")
    return wandb.init(project=os.environ["WANDB_PROJECT"], group=strategy, tags=tags, config=config,
                      dir=str(run_dir), name=run_dir.name, reinit="finish_previous")


def log_final_to_wandb(run, results: dict[str, Any], predictions: Path) -> None:
    if run is None:
        return
    import wandb

    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    table = wandb.Table(columns=["pair_id", "image", "answer", "score_A", "score_B"],
                        data=[[r["pair_id"], r["image"], r.get("answer"), (r.get("scores") or {}).get("A"),
                               (r.get("scores") or {}).get("B")] for r in rows])
    run.log({"test/predictions": table})
    for name in ("base", "final"):
        for key in ("set_accuracy", "confusion", "individual_accuracy", "invalid"):
            run.summary[f"test/{name}_{key}"] = results[name][key]
    run.finish()
