"""What every recipe run shares: data resolution, the run directory, the leakage audit, W&B."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unconfuse.eval.io import atomic_write_json, sha256_file
from unconfuse.eval.pairs import Benchmark, load_benchmark


@dataclass
class TrainConfig:
    """The training settings every recipe has (a recipe subclasses it to change defaults or add some)."""

    max_steps: int = 100
    pairs_per_batch: int = 4  # per device; a batch holds 2x this many examples (both images of each pair)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    lr_scheduler: str = "cosine"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    eval_steps: int = 25  # validation cadence (also at step 0)
    save_steps: int = 50  # resumable Trainer checkpoints
    logging_steps: int = 10
    patience: int = 0  # evaluations without improvement before stopping; 0 = never
    seed: int = 0
    bf16: bool = False


def trainer_arguments(t: TrainConfig, run_dir: Path, report_to_wandb: bool, launch: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments keywords from the shared settings, the run directory and ``launch_settings()``."""
    import sys

    return dict(output_dir=str(run_dir / "checkpoints"), max_steps=t.max_steps,
                per_device_train_batch_size=2 * t.pairs_per_batch, learning_rate=t.learning_rate,
                weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler,
                gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
                logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps, seed=t.seed,
                data_seed=t.seed, bf16=t.bf16, report_to=["wandb"] if report_to_wandb else [],
                dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(), **launch)


class LeakageError(RuntimeError):
    """Training images appear in the validation or test pairs."""


def resolve_data(arg: str) -> Benchmark:
    """A benchmark argument (``world:<split>`` is the default embedded world's split)."""
    return load_benchmark(arg)


def run_recipe(recipe: str, config: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run ``recipes/<recipe>.py`` in this process with a YAML config and dotted overrides; its results."""
    import importlib

    from unconfuse.train.config import load_config

    module = importlib.import_module(f"unconfuse.recipes.{recipe}")
    return module.main(load_config(module.CONFIG_CLASS, config, list(overrides or [])))


def recipe_cli(recipe: str, summarize, argv: list[str] | None = None) -> int:
    """The command line every recipe module has: ``--config YAML`` and ``key=value`` overrides;
    prints ``summarize(results)``."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m unconfuse.recipes.{recipe}")
    parser.add_argument("--config", help=f"recipe YAML (configs/{recipe}/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    print(summarize(run_recipe(recipe, args.config, args.overrides)))
    return 0


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
