"""The ``unconfuse`` command line: the commands that need no training (from eval/tools), and the ones
above the recipes: train, cv, merge and the demo. Nothing below this folder imports it."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from unconfuse.eval.tools.cli import add_eval_commands
from unconfuse.recipes import RECIPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unconfuse", description=(
        "Evaluate and fine-tune medical MLLMs and vision encoders on MediConfusion-style confusing pairs."))
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_commands(sub)
    p = sub.add_parser("train", add_help=False, help="run a mitigation recipe (in-process, or through accelerate "
                       "launch with --launch); `unconfuse train RECIPE --help` lists its config fields")
    p.add_argument("recipe", nargs="?", choices=RECIPES, help="recipe name (recipes/<name>.py)")
    p.add_argument("-h", "--help", action="store_true", help="this help; with a recipe, every config field of it")
    p.add_argument("--config", help="recipe YAML, e.g. configs/clip_hardneg/tiny.yaml (default: the recipe's defaults)")
    p.add_argument("--output-dir", help="the run directory (the same as the override output_dir=DIR)")
    p.add_argument("--launch", help="accelerate config YAML (configs/accelerate/*.yaml): run under accelerate launch")
    p.add_argument("--force", action="store_true", help="start afresh in an output dir holding another run "
                   "(its contents are moved aside, not deleted)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10 loss.hardneg_weight=0")
    p.set_defaults(func=_cmd_train, train_parser=p)

    p = sub.add_parser("cv", help="grouped K-fold cross-validation of a recipe: train on K-1 folds, test on the held-out one")
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--config", required=True, help="recipe YAML; its data.* are replaced by the folds")
    p.add_argument("--folds", type=int, required=True)
    p.add_argument("--benchmark", default="mediconfusion", help="benchmark to fold (default: mediconfusion; world:<split> for the embedded world)")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    p.add_argument("--output-dir", "--out", dest="out", default=None,
                   help="cv directory (default runs/cv-<recipe>-<time>); rerun to resume")
    p.add_argument("--force", action="store_true", help="start afresh in a cv directory holding another cv "
                   "(its contents are moved aside, not deleted)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every fold's run")
    p.set_defaults(func=_cmd_cv)

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


def quiet_cpu_deepspeed() -> None:
    """Without an NVIDIA driver, tell DeepSpeed (which accelerate imports) that it runs on the CPU, which
    it would pick anyway after logging a warning on every start."""
    if not os.path.exists("/proc/driver/nvidia"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _cmd_train(args: argparse.Namespace) -> int:
    from ..run import recipe_cli

    if args.recipe is None:
        if args.help:
            args.train_parser.print_help()
            return 0
        args.train_parser.error(f"a recipe is required: {', '.join(RECIPES)}")
    argv = [*(["--help"] if args.help else []), *(["--config", args.config] if args.config else []),
            *(["--output-dir", args.output_dir] if args.output_dir else []), *(["--force"] if args.force else []),
            *args.overrides]
    if args.launch and not args.help:
        return launch(args.recipe, args.launch, argv)
    return recipe_cli(args.recipe, argv)


def launch(recipe: str, accelerate_config: str, argv: list[str]) -> int:
    """``accelerate launch --config_file ACCEL -m unconfuse.recipes.RECIPE ARGV`` (the recipe's own
    command line: ``--config``, ``--output-dir``, overrides).

    On a machine without GPUs, DDP configs need ``--multi_gpu`` to start real processes (``--cpu``
    starts one), and the recipe switches the trainer to CPU itself.
    """
    import subprocess
    import tempfile

    import torch
    import yaml

    from unconfuse.train.run import EXIT_STATUS_ENV

    with open(accelerate_config, encoding="utf-8") as fh:
        accel = yaml.safe_load(fh) or {}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    if not torch.cuda.is_available() and accel.get("distributed_type") == "MULTI_GPU":
        command.append("--multi_gpu")
    command += ["-m", f"unconfuse.recipes.{recipe}", *argv]
    # accelerate launch turns any failing child into exit 1: the recipe leaves its own exit status
    # (2: bad input, 3: the run diverged) in a file, and that is what this command returns
    with tempfile.TemporaryDirectory(prefix="unconfuse-launch-") as tmp:
        status_file = Path(tmp) / "exit_status"
        returncode = subprocess.call(command, env={**os.environ, EXIT_STATUS_ENV: str(status_file)})
        recorded = status_file.read_text().strip() if status_file.exists() else ""
    return int(recorded) if returncode and recorded.isdigit() else returncode


def _cmd_cv(args: argparse.Namespace) -> int:
    import time

    from unconfuse.eval.benchmarks import BenchmarkError

    from ..callbacks import NonFiniteError
    from ..config import ConfigError
    from ..run import LeakageError
    from .cv import cv_summary, run_cv

    out = args.out or f"runs/cv-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        results = run_cv(args.recipe, args.config, args.folds, args.benchmark, out, args.seed, args.overrides,
                         force=args.force)
    except (BenchmarkError, ConfigError, LeakageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(cv_summary(results))
    print(f"cv directory: {out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from unconfuse.eval.models.hf_vlm import merge_adapters

    model, processor = merge_adapters(Path(args.adapters), args.base)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"merged model written to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from .demo import run_demo

    run_demo(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", seed=args.seed, mllm_steps=args.mllm_steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_cpu_deepspeed()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train R --config C --launch L a.b=1`
        if args.command not in ("train", "cv") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
