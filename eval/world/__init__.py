"""The embedded world: a MediConfusion-format benchmark built from real radiology images that install
from PyPI, and the tiny models (random or briefly pretrained on its corpus) that run offline.

It uses the eval core and is never imported by it: the core only locates what this package builds
(``world:<split>`` arguments, presets with ``build:``). ``prepare`` builds them on first use; the
``unconfuse`` commands and the recipes call it for their arguments.
"""
from __future__ import annotations

from typing import Iterable

from .generator import (QUESTIONS, SOURCES, SPLITS, World, WorldConfig, WorldError, caption, default_world,
                        synthesize, verify_world)

__all__ = ["QUESTIONS", "SOURCES", "SPLITS", "World", "WorldConfig", "WorldError", "caption", "default_world",
           "prepare", "synthesize", "verify_world"]


def prepare(models: Iterable[str | None] = (), benchmarks: Iterable[str | None] = ()) -> None:
    """Build what these arguments need, once: the default world for any ``world:<split>`` benchmark,
    and every preset among ``models`` that is built from config (its ``build:`` settings)."""
    from ..models import find_preset

    if any(str(b).startswith("world:") for b in benchmarks if b):
        default_world()
    for name in models:
        spec = find_preset(name) if name else None
        if spec is not None and spec.build:
            from .tiny import materialize

            materialize(spec.name, spec.build)
