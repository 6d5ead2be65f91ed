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

    p = sub.add_parser("merge", help="merge LoRA adapters (a run's checkpoints/best) into a model folder that eval loads")
    p.add_argument("adapters", help="folder with adapter_config.json, e.g. RUN/checkpoints/best")
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="base model folder or hub id (default: the one the adapters name)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("demo", help="the main job: evaluate the tiny preset models on real radiology images, offline")
    p.add_argument("--out", default=None, help="where everything goes (default runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
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

    run_demo(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train R --config C --launch L a.b=1`
        if args.command != "train" or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
