"""Every ``unconfuse`` command (the entry point ``unconfuse.cli:main``): eval-side ones that need no training
(``cli/eval.py``), and the ones above the recipes: train, cv, study, interpolate, plan, the demo. Nothing else
imports this package; importing it does nothing until ``main`` runs."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the ``unconfuse`` command line with ``argv`` (default: this process's arguments); its exit status."""
    from unconfuse.cli.commands import main as run

    return run(argv)
