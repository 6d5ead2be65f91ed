"""The ``unconfuse`` command line: the commands that need no training (``cli/eval.py``), and the ones above the
recipes: train, cv, study, interpolate, plan, merge and the demo. Nothing outside this folder imports it."""
from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from unconfuse.cli.eval import add_eval_commands, run_command
from unconfuse.recipes import RECIPES
from unconfuse.train.config import TrainSettings


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
    jobs = p.add_mutually_exclusive_group()
    jobs.add_argument("--fold", type=int, metavar="K", help="run fold K alone (its own job: run the folds side by side, "
                      "then --collect); rerun to resume it")
    jobs.add_argument("--collect", action="store_true", help="pool the folds run with --fold (refused, listing them, "
                      "while any has not finished)")
    p.add_argument("--launch", help="accelerate config YAML: each fold trains under accelerate launch")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every fold's run")
    p.set_defaults(func=_cmd_cv)

    study = sub.add_parser("study", help="a mitigation study (strategies x seeds x folds) as independent cv fold jobs "
                           "for any scheduler").add_subparsers(dest="study_command", required=True)
    p = study.add_parser("plan", help="print one command per job (a cv fold), one per line: for a Slurm array "
                         "(configs/slurm/array.sbatch), a shell loop or any scheduler")
    p.add_argument("study", help="study YAML (see configs/studies/)")
    p.set_defaults(func=_cmd_study_plan)
    p = study.add_parser("collect", help="pool every cv of the study (--collect) and compare all of them in one "
                         "`unconfuse compare`")
    p.add_argument("study", help="study YAML")
    p.set_defaults(func=_cmd_study_collect)

    p = sub.add_parser("interpolate", help="weight-space interpolation (WiSE-FT) between a run's base and its selected "
                       "weights: every alpha scored on the val pairs and val retention, the chosen one tested once")
    p.add_argument("run", help="a training run's folder (its checkpoints/best, config.yaml and results.json)")
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                   help="comma-separated alphas in [0, 1] (0: the base, always scored; 1: the run's weights)")
    p.add_argument("--out", help="the output run folder (default: RUN-wise beside the run)")
    p.add_argument("--selection", choices=typing.get_args(typing.get_type_hints(TrainSettings)["selection"]),
                   help="how the alpha is chosen on the validation side (default: the run's train.selection)")
    p.add_argument("--retention-floor", type=float, help="with a retention floor: the largest val retention drop "
                   "(points) from the base (default: the run's train.retention_floor)")
    p.add_argument("--force", action="store_true", help="start afresh in an output folder holding another run "
                   "(its contents are moved aside, not deleted)")
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser("plan", help="the GPU memory a recipe config needs at the model's real size (weights, gradients, "
                       "optimizer state, activations, scoring) under a launch, and a verdict per GPU size; no weights loaded")
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--config", required=True, help="recipe YAML of a real model, e.g. configs/mllm_dpo/qwen2_5_vl.yaml")
    p.add_argument("--launch", help="accelerate config YAML (configs/accelerate/*.yaml): processes and ZeRO stage "
                   "(default: one process)")
    p.add_argument("--gpu-memory", help="one GPU size for the verdict, e.g. 80GB (default: 24, 40, 80 and 141 GB)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.pairs_per_batch=2")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("merge", help="merge LoRA adapters (a run's checkpoints/best) into a model folder that eval loads")
    p.add_argument("adapters", help="folder with adapter_config.json, e.g. RUN/checkpoints/best")
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="base model folder or hub id (default: the one the adapters name)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("demo", help="the main job: evaluate the tiny preset models on real radiology images, offline")
    p.add_argument("--out", default=None, help="where everything goes (default runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mllm-steps", type=int, default=None,
                   help="training steps of every MLLM run (default: the demo's own per recipe; 0 skips act 2)")
    p.add_argument("--workers", type=int, default=None,
                   help="jobs (base-model builds, runs) side by side in this many processes, each on its share of "
                        "the cores (default: 2 on 2 cores or more; 1 runs them in turn in this process)")
    p.set_defaults(func=_cmd_demo)
    return parser


def quiet_cpu_deepspeed() -> None:
    """Without an NVIDIA driver, tell DeepSpeed (which accelerate imports) that it runs on the CPU, which
    it would pick anyway after logging a warning on every start."""
    if not os.path.exists("/proc/driver/nvidia"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _cmd_train(args: argparse.Namespace) -> int:
    from unconfuse.recipes import recipe_cli

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
    command line: ``--config``, ``--output-dir``, overrides) through ``unconfuse.eval.launch.accelerate_launch``,
    the one launcher (``--multi_gpu`` for DDP configs on CPU; the recipe's own exit status, 2 or 3,
    comes back). The recipe switches the trainer to CPU itself.
    """
    from unconfuse.eval.launch import accelerate_launch

    return accelerate_launch(f"unconfuse.recipes.{recipe}", accelerate_config, argv)


def _cmd_cv(args: argparse.Namespace) -> int:
    import time

    from unconfuse.eval.benchmarks import BenchmarkError
    from unconfuse.eval.leakage import LeakageError
    from unconfuse.eval.scorer import fmt
    from unconfuse.train.callbacks import NonFiniteError
    from unconfuse.train.config import ConfigError

    from .cv import FoldFailed, collect_cv, cv_summary, run_cv, run_fold

    if args.out is None and (args.fold is not None or args.collect):
        print("error: --fold and --collect need --out (the cv directory every job of the cv shares)", file=sys.stderr)
        return 2
    out = args.out or f"runs/cv-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    common = (args.recipe, args.config, args.folds, args.benchmark, out)
    try:
        if args.fold is not None:
            if args.force:
                raise ValueError("--force with --fold: a fold job never moves the cv aside; give the fold's "
                                 "own run force=true, or start the whole cv afresh without --fold")
            fold = run_fold(*common, args.fold, args.seed, args.overrides, launch=args.launch)
            print(f"fold {args.fold}: set accuracy {fmt(fold.final['set_accuracy'])} (base "
                  f"{fmt(fold.base['set_accuracy'])}); when every fold is done: unconfuse cv ... --collect")
            print(f"fold directory: {Path(out) / f'fold-{args.fold}'}")
            return 0
        if args.collect:
            results = collect_cv(*common, args.seed, args.overrides)
        else:
            results = run_cv(*common, args.seed, args.overrides, force=args.force, launch=args.launch)
    except (BenchmarkError, ConfigError, LeakageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except FoldFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    print(cv_summary(results))
    print(f"cv directory: {out}")
    return 0


def _cmd_study_plan(args: argparse.Namespace) -> int:
    from .study import StudyError, load_study, plan_lines

    try:
        print("\n".join(plan_lines(load_study(args.study))))
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_study_collect(args: argparse.Namespace) -> int:
    from unconfuse.eval.tools.compare import compare_summary

    from .study import collect_study, load_study

    try:
        study = load_study(args.study)
        summary = collect_study(study)
    except ValueError as exc:  # StudyError, MissingFolds, CompareError, RunDirError: a one-line reason
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare_summary(summary, study.compare_dir))
    return 0


class _BadInput(Exception):
    """Raised by ``_one_line_errors`` with the exit status of a bad-input error it already printed."""

    def __init__(self, status: int):
        self.status = status


def _one_line_errors(work):
    """``work()``'s value; bad input (config, data, model, run folder) printed as one ``error:`` line and raised as
    ``_BadInput`` with its exit status (2, as `unconfuse train`); a bug keeps its traceback."""
    from unconfuse.recipes import exit_status

    try:
        return work()
    except Exception as exc:
        status = exit_status(exc)
        if status is None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise _BadInput(status) from None


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from .interpolate import interpolate, parse_alphas

    try:
        out = _one_line_errors(lambda: interpolate(args.run, parse_alphas(args.alphas), args.out, args.selection,
                                                   args.retention_floor, args.force))
    except _BadInput as bad:
        return bad.status
    print(f"interpolated run: {out} (pareto.png, pareto.json; compare it like any run)")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .plan import format_plan, make_plan, parse_gpu_memory

    quiet_cpu_deepspeed()
    try:
        plan = _one_line_errors(lambda: make_plan(args.recipe, args.config, args.overrides, args.launch,
                                                  parse_gpu_memory(args.gpu_memory)))
    except _BadInput as bad:
        return bad.status
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
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

    from unconfuse.recipes import exit_status

    from .demo import run_demo
    from .jobs import JobFailed

    try:
        run_demo(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", seed=args.seed, mllm_steps=args.mllm_steps,
                 workers=args.workers)
    except JobFailed as exc:  # a job's bad input (its run folder, config, data): one line, as `unconfuse train` does
        status = exit_status(exc.__cause__)
        if status is None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return status
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_cpu_deepspeed()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train R --config C --launch L a.b=1`
        if args.command not in ("train", "cv", "plan") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
