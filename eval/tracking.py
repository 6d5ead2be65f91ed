"""The one way unconfuse starts a W&B run: project ``$WANDB_PROJECT`` (default ``unconfuse``), and offline unless
an API key is in the environment, so no command ever blocks on the network. The key is read by wandb from the
environment and never written by us; nothing here changes the environment."""
from __future__ import annotations

import os
from typing import Any


def wandb_mode() -> str:
    """``disabled`` or ``offline`` when ``WANDB_MODE`` says so; else ``online`` with ``WANDB_API_KEY`` set, and
    ``offline`` without it (also when ``WANDB_MODE=online`` asks for the network without a key)."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("disabled", "offline", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_project() -> str:
    return os.environ.get("WANDB_PROJECT", "unconfuse")


def start_wandb_run(name: str, folder: str, **settings: Any):
    """A W&B run named ``name`` writing under ``folder`` (``$WANDB_DIR`` when set), in ``wandb_mode()``;
    ``settings``: wandb.init's others (job_type, group, tags, config)."""
    import wandb

    return wandb.init(project=wandb_project(), mode=wandb_mode(), name=name, dir=os.environ.get("WANDB_DIR") or folder,
                      **settings)
