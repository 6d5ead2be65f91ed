"""Warm starts: a run that begins from another run's selected adapters (``init_adapters``: sft first, then
preference or RL). The other run must be finished, adapt the same base model and have trained on the same
pairs: a warm start from another fold's run would carry that fold's test pairs into this one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from unconfuse.train.config import ConfigError


def init_adapters_folder(arg: str) -> Path:
    """The adapters ``init_adapters`` names: a finished run's ``checkpoints/best``."""
    from unconfuse.eval.runs import read_run_results

    run_dir = Path(arg).expanduser()
    if run_dir.name == "best" and run_dir.parent.name == "checkpoints":
        run_dir = run_dir.parent.parent
    if not (run_dir / "fingerprint.json").is_file():
        raise ConfigError(f"init_adapters: {arg} is not a run folder (no fingerprint.json); give the folder of a "
                          "finished mllm run (its checkpoints/best are loaded)")
    try:
        results = read_run_results(run_dir)
    except ValueError:
        raise ConfigError(f"init_adapters: {arg} has not finished (no run record in results.json); let it finish "
                          "(or rerun it to resume) first") from None
    if results.kind != "run" or not (run_dir / "checkpoints" / "best" / "adapter_config.json").is_file():
        raise ConfigError(f"init_adapters: {arg} holds no selected LoRA adapters (checkpoints/best/adapter_config.json)")
    return run_dir / "checkpoints" / "best"


def check_init_adapters(arg: str, model: str, train) -> tuple[Path, dict[str, Any]]:
    """Refuse an init run trained on other data than ``train`` or on another base model (a warm start from
    another fold would carry that fold's test pairs into this run); its adapters' folder and identity (for the
    run's fingerprint)."""
    import json

    from unconfuse.eval.models import model_identity, resolve_model

    best = init_adapters_folder(arg)
    source = json.loads((best.parent.parent / "fingerprint.json").read_text())
    if source.get("data", {}).get("train") != train.fingerprint():
        raise ConfigError(f"init_adapters: {arg} was trained on other data than this run's data.train ({train.name}); "
                          "a warm start must come from a run on the same training pairs (in a cv or study: the same fold)")
    if source.get("model") != model_identity(resolve_model(model)):
        raise ConfigError(f"init_adapters: {arg} adapts another base model than this run's {model!r}")
    return best, model_identity(resolve_model(str(best)))
