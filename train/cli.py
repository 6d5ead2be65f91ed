"""The ``unconfuse`` command line: evaluation commands (from eval/) and the main job."""
from __future__ import annotations

import argparse
import sys

from unconfuse.eval.cli import add_eval_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unconfuse", description=(
        "Evaluate and fine-tune medical MLLMs and vision encoders on MediConfusion-style confusing pairs."))
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_commands(sub)
    p = sub.add_parser("train", help="run a mitigation recipe (in-process, or through accelerate launch with --launch)")
    p.add_argument("recipe", choices=RECIPES, help="recipe name (recipes/<name>.py)")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/clip_hardneg/tiny.yaml")
    p.add_argument("--launch", help="accelerate config YAML (configs/accelerate/*.yaml): run under accelerate launch")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10 loss.hardneg_weight=0")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("cv", help="grouped K-fold cross-validation of a recipe: train on K-1 folds, test on the held-out one")
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--config", required=True, help="recipe YAML; its data.* are replaced by the folds")
    p.add_argument("--folds", type=int, required=True)
    p.add_argument("--benchmark", default="mediconfusion", help="benchmark to fold (default: mediconfusion; world:<split> for the embedded world)")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    p.add_argument("--out", default=None, help="cv directory (default runs/cv-<recipe>-<time>); rerun to resume")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every fold's run")
    p.set_defaults(func=_cmd_cv)

    p = sub.add_parser("mine", help="mine confusing pairs from an image-caption corpus (encoder A alike, encoder B apart)")
    p.add_argument("--corpus", required=True, help="JSONL of {image, caption}, a ROCO-style folder, or hf:<dataset id>")
    p.add_argument("--out", required=True, help="folder for pairs.jsonl and mining.json")
    p.add_argument("--encoder-a", default="biomedclip", help="the kind of encoder being fixed (default biomedclip)")
    p.add_argument("--encoder-b", default="dinov2-base", help="vision-only encoder (default dinov2-base)")
    p.add_argument("--min-sim-a", type=float, default=0.9)
    p.add_argument("--max-sim-b", type=float, default=0.75)
    p.add_argument("--max-pairs-per-image", type=int, default=3)
    p.add_argument("--exclude", nargs="+", default=None, metavar="BENCHMARK",
                   help="benchmarks whose images (and near-duplicates) never enter a pair (default: mediconfusion when downloaded)")
    p.add_argument("--no-exclude", action="store_true", help="exclude nothing")
    p.add_argument("--dedup-phash-distance", type=int, default=4)
    p.add_argument("--dedup-sim-b", type=float, default=0.95)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--search", choices=("auto", "faiss", "numpy"), default="auto")
    p.add_argument("--make-questions", action="store_true", help="have an LLM write one question per pair from the captions")
    p.add_argument("--llm-url", help="OpenAI-compatible endpoint (key from UNCONFUSE_JUDGE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--llm-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.set_defaults(func=_cmd_mine)

    p = sub.add_parser("compare", help="compare runs (recipe, cv or eval directories) with CIs and significance against a baseline")
    p.add_argument("runs", nargs="+", help="run, cv or scored directories")
    p.add_argument("--baseline", required=True, help="the run to compare against, e.g. RUN/base or an eval directory")
    p.add_argument("--out", required=True, help="folder for comparison.md, comparison.csv, comparison.png")
    p.add_argument("--benchmark", help="test benchmark (default: the one the runs name)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("merge", help="merge LoRA adapters (a run's checkpoints/best) into a model folder that eval loads")
    p.add_argument("adapters", help="folder with adapter_config.json, e.g. RUN/checkpoints/best")
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="base model folder or hub id (default: the one the adapters name)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("demo", help="the main job: evaluate the tiny preset models on real radiology images, offline")
    p.add_argument("--out", default=None, help="where everything goes (default runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mllm-steps", type=int, default=None,
                   help="training steps of both MLLM runs (default: sft 600, dpo 400; 0 skips the act)")
    p.set_defaults(func=_cmd_demo)
    return parser


RECIPES = ("clip_hardneg", "mllm_sft", "mllm_dpo")


def _cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from .config import ConfigError
    from .run import LeakageError

    if args.launch:
        return launch(args.recipe, args.config, args.launch, args.overrides)
    module = importlib.import_module(f"unconfuse.recipes.{args.recipe}")
    try:
        return module.cli(["--config", args.config, *args.overrides])
    except (ConfigError, LeakageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def launch(recipe: str, config: str, accelerate_config: str, overrides: list[str]) -> int:
    """``accelerate launch --config_file ACCEL -m unconfuse.recipes.RECIPE --config CONFIG ...``.

    On a machine without GPUs, DDP configs need ``--multi_gpu`` to start real processes (``--cpu``
    starts one), and the recipe switches the trainer to CPU itself.
    """
    import subprocess

    import torch
    import yaml

    with open(accelerate_config, encoding="utf-8") as fh:
        accel = yaml.safe_load(fh) or {}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    if not torch.cuda.is_available() and accel.get("distributed_type") == "MULTI_GPU":
        command.append("--multi_gpu")
    command += ["-m", f"unconfuse.recipes.{recipe}", "--config", config, *overrides]
    return subprocess.call(command)


def _cmd_cv(args: argparse.Namespace) -> int:
    import time

    from unconfuse.eval.pairs import BenchmarkError

    from .config import ConfigError
    from .cv import cv_summary, run_cv
    from .run import LeakageError

    out = args.out or f"runs/cv-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        results = run_cv(args.recipe, args.config, args.folds, args.benchmark, out, args.seed, args.overrides)
    except (BenchmarkError, ConfigError, LeakageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cv_summary(results))
    print(f"cv directory: {out}")
    return 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from unconfuse.eval.judge import JudgeError
    from unconfuse.eval.models.base import ModelLoadError
    from unconfuse.eval.pairs import BenchmarkError

    from .mining import MiningConfig, MiningError, mine

    cfg = MiningConfig(corpus=args.corpus, out=args.out, encoder_a=args.encoder_a, encoder_b=args.encoder_b,
                       min_sim_a=args.min_sim_a, max_sim_b=args.max_sim_b, max_pairs_per_image=args.max_pairs_per_image,
                       exclude=[] if args.no_exclude else args.exclude, dedup_phash_distance=args.dedup_phash_distance,
                       dedup_sim_b=args.dedup_sim_b, block_size=args.block_size, batch_size=args.batch_size,
                       search=args.search, make_questions=args.make_questions, llm_url=args.llm_url,
                       llm_model=args.llm_model, seed=args.seed, device=args.device)
    try:
        report = mine(cfg)
    except (MiningError, BenchmarkError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JudgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{report['corpus_images']} corpus images, {report['leakage']['excluded_images']} excluded as benchmark "
          f"images or near-duplicates; {report['candidates_sim_a']} pairs with cos(A) >= {cfg.min_sim_a}, "
          f"{report['candidates_rule']} of them with cos(B) <= {cfg.max_sim_b}; kept {report['pairs']} "
          f"({report['search_backend']} search, {report['wall_time_s']:.1f} s) -> {args.out}/pairs.jsonl")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unconfuse.eval.pairs import BenchmarkError

    from .compare import CompareError, compare_summary, run_compare

    try:
        summary = run_compare(args.runs, args.baseline, args.out, benchmark=args.benchmark)
    except (CompareError, BenchmarkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare_summary(summary, Path(args.out)))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unconfuse.train.mllm import merge_adapters

    model, processor = merge_adapters(Path(args.adapters), args.base)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"merged model written to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    import time

    run_demo(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", seed=args.seed, mllm_steps=args.mllm_steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train R --config C --launch L a.b=1`
        if args.command not in ("train", "cv") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
