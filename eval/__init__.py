"""unconfuse.eval: the MediConfusion scorer and everything around it (benchmarks, models, prompts, runs). What a
notebook needs is importable from here; each name loads its module on first use, so importing this package
loads nothing (no torch) and changes nothing::

    from unconfuse.eval import load_benchmark, load_model, evaluate, compare
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_benchmark": "unconfuse.eval.benchmarks",
    "load_model": "unconfuse.eval.models",
    "resolve_model": "unconfuse.eval.models",
    "list_presets": "unconfuse.eval.models",
    "evaluate": "unconfuse.eval.evaluation",
    "compare": "unconfuse.eval.evaluation",
    "Evaluation": "unconfuse.eval.evaluation",
    "load_prompts": "unconfuse.eval.prompts",
    "load_retention": "unconfuse.eval.retention",
    "score": "unconfuse.eval.scorer",
    "prepare": "unconfuse.eval.world",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unconfuse.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
