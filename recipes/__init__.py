"""The mitigation recipes: one file each, read top to bottom (data -> model -> trainer -> train); and running
one, from Python (``run_recipe``) or a command line (``recipe_cli``, what ``unconfuse train`` and ``accelerate
launch -m unconfuse.recipes.<name>`` run)::

    from unconfuse.recipes import run_recipe
    results = run_recipe("mllm_sft", "mllm_sft/tiny", ["train.max_steps=20"])

Adding a recipe: write ``recipes/<name>.py`` (a ``CONFIG_CLASS`` dataclass and ``main(cfg) ->
RunResults`` that calls the shared steps of ``unconfuse.train.lifecycle``), add its name to ``RECIPES``,
and put its configs in ``configs/<name>/``. The CLI (``unconfuse train``/``cv``), the demo, the
config test and ``unconfuse compare`` pick it up from here.
"""
from __future__ import annotations

import errno
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from unconfuse.eval.runs import RunResults

RECIPES = (
    "clip_hardneg",  # contrastive fine-tuning of a CLIP-style encoder, confusing pairs as hard negatives
    "mllm_sft",  # LoRA SFT of an MLLM on the pair questions (TRL SFTTrainer)
    "mllm_dpo",  # preference tuning of an MLLM with the pair image-contrast term (TRL DPOTrainer)
    "mllm_grpo",  # RL of an MLLM with a reward for the set-accuracy event (TRL GRPOTrainer)
)


def recipe_module(name: str) -> ModuleType:
    """The module of recipe ``name`` (imported on demand: recipes pull in torch and transformers)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return importlib.import_module(f"unconfuse.recipes.{name}")


def run_recipe(recipe: str, config: str | Path | None, overrides: list[str] | None = None,
               callbacks: Sequence[Any] = ()) -> RunResults:
    """Run recipe ``recipe`` (from ``RECIPES``) in this process with a YAML config (a path, or a shipped config's
    name: ``mllm_sft/tiny``) and dotted ``key=value`` overrides; its run record. ``callbacks``: TrainerCallbacks
    added after the run's own. A run that finished before returns its record without training."""
    from unconfuse.eval.models.hf_vlm import peft_deprecation_quiet
    from unconfuse.train.config import load_config
    from unconfuse.train.lifecycle import AlreadyFinished

    module = recipe_module(recipe)
    try:
        with peft_deprecation_quiet():
            return module.main(load_config(module.CONFIG_CLASS, config, list(overrides or [])), callbacks)
    except AlreadyFinished as done:
        print(f"{done.run_dir}: finished before ({done.results.steps} steps, {done.results.attempts} attempt(s)); "
              f"nothing to do (--force starts afresh)", file=sys.stderr, flush=True)
        return done.results


def recipe_cli(recipe: str, argv: list[str] | None = None) -> int:
    """The command line every recipe module has: ``--config YAML``, ``key=value`` overrides and
    ``--help`` listing every config field. Bad config or data: exit 2 with a one-line message."""
    import argparse

    from unconfuse.train.config import describe
    from unconfuse.train.lifecycle import summary

    module = recipe_module(recipe)
    parser = argparse.ArgumentParser(prog=f"unconfuse train {recipe}", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=(module.__doc__ or "").split("\n\n")[0],
                                     epilog="config fields (YAML keys, or key=value overrides):\n" + describe(module.CONFIG_CLASS)
                                     + "\n\nunconfuse train also takes --launch ACCELERATE_YAML: the same run under accelerate launch")
    parser.add_argument("--config", help=f"recipe YAML (configs/{recipe}/*.yaml)")
    parser.add_argument("--output-dir", help="the run directory (the same as the override output_dir=DIR)")
    parser.add_argument("--force", action="store_true", help="start afresh in an output dir holding another run "
                        "(the same as force=true; its contents are moved aside, not deleted)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *([f"output_dir={args.output_dir}"] if args.output_dir else []),
                 *(["force=true"] if args.force else [])]
    from unconfuse.eval.stopping import Stopped, graceful_stop, report_stopped

    with graceful_stop():  # what `accelerate launch` runs in every process: each saves and stops on SIGTERM
        try:
            print(summary(run_recipe(recipe, args.config, overrides)))
        except Stopped as exc:
            return report_stopped(exc)
        except Exception as exc:
            status = exit_status(exc)
            if status is None:
                raise
            return _failed(exc, status)
    return 0


def exit_status(exc: BaseException) -> int | None:
    """The exit status of a run that raised ``exc``: 2 for bad input (config, data, model, run folder or record), 3 for a
    run that diverged, None for anything else (a bug: let its traceback show)."""
    from unconfuse.eval.benchmarks import BenchmarkError
    from unconfuse.eval.folders import RunDirError
    from unconfuse.eval.leakage import LeakageError
    from unconfuse.eval.models import ModelLoadError
    from unconfuse.eval.runs import RunFormatError
    from unconfuse.train.callbacks import NonFiniteError
    from unconfuse.train.config import ConfigError

    if isinstance(exc, (ConfigError, LeakageError, BenchmarkError, ModelLoadError, RunDirError, RunFormatError)):
        return 2
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # a full disk: its message names the file
        return 2
    return 3 if isinstance(exc, NonFiniteError) else None


def _failed(exc: Exception, status: int) -> int:
    """One error line, and the exit status also written where ``unconfuse train --launch`` reads it
    (accelerate launch reports every failing process as exit 1)."""
    from unconfuse.eval.launch import record_exit_status

    print(f"error: {exc}", file=sys.stderr)
    record_exit_status(status)
    return status
