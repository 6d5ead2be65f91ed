"""How this process was launched (plain, DDP or DeepSpeed via accelerate), its device, and whole weights where
DeepSpeed ZeRO-3 shards them (gathered for a save or a scoring pass)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any


def launch_settings() -> dict[str, Any]:
    """TrainingArguments settings for how this process was launched (plain, DDP, or DeepSpeed via
    accelerate). On CPU + DeepSpeed, accelerate leaves the process group unset: create it with
    gloo here and tell the Trainer to use it (``use_configured_state``)."""
    import torch

    deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else None
    cpu = not torch.cuda.is_available()
    if deepspeed and cpu:
        from accelerate import PartialState

        PartialState(backend="gloo")
    return {"deepspeed": deepspeed, "use_cpu": cpu,
            "accelerator_config": {"use_configured_state": True} if deepspeed and cpu else None}


def process_device() -> str:
    """This process's own device under any launch (``cuda:<local rank>`` with several GPUs, else
    ``cuda`` or ``cpu``): each rank loads its model there, never all on GPU 0."""
    from accelerate import PartialState

    return str(PartialState().device)


@contextmanager
def gathered(parameters, modifier_rank: int | None = None):
    """Whole ``parameters`` on every process for the block, where DeepSpeed ZeRO-3 shards them (with
    ``modifier_rank``, that process's changes are written back to the shards); nothing otherwise.
    Every process must enter it: gathering is collective."""
    sharded = [p for p in parameters if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield


@contextmanager
def whole_weights(trainer=None):
    """Whole weights on every process for a scoring pass, so that each process can score its own share
    of the pairs: under ZeRO-3 the trainer's shards are gathered and DeepSpeed's hooks lifted for the pass
    (what TRL's ``unwrap_model_for_generation`` does for generation, with TRL's hook helpers); nothing otherwise."""
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer is not None and trainer.is_deepspeed_enabled else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    engine = trainer.model_wrapped  # the DeepSpeed engine once training started, else the model (no hooks yet)
    with deepspeed.zero.GatheredParameters(list(engine.parameters())):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)
