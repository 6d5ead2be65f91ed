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
    p = sub.add_parser("demo", help="the main job: evaluate the tiny preset models on real radiology images, offline")
    p.add_argument("--out", default="runs/demo", help="where benchmark, predictions and results go")
    p.set_defaults(func=_cmd_demo)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
