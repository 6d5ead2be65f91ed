"""Where unconfuse keeps downloads, caches and built models: ``$UNCONFUSE_HOME`` or ``~/.cache/unconfuse``."""
from __future__ import annotations

import os
from pathlib import Path


def unconfuse_home() -> Path:
    """The cache root: ``$UNCONFUSE_HOME``, else ``$XDG_CACHE_HOME/unconfuse``, else ``~/.cache/unconfuse``."""
    env = os.environ.get("UNCONFUSE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unconfuse"


def default_world_root() -> Path:
    """Where ``world:<split>`` benchmark arguments point: the default embedded world."""
    return unconfuse_home() / "worlds" / "default"


def built_model_dir(name: str) -> Path:
    """Where a preset that is built from config (``build:``, the tiny models) is kept."""
    return unconfuse_home() / "models" / name


def config_dir() -> Path:
    """The shipped configs (recipe YAMLs, model presets, launch configs): ``configs/`` beside the package folders in
    a checkout or an editable install, ``unconfuse.configs`` in an installed wheel."""
    beside = Path(__file__).resolve().parents[1] / "configs"
    if beside.is_dir():
        return beside
    import unconfuse.configs

    return Path(unconfuse.configs.__file__).parent
