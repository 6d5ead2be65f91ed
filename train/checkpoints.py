"""What a Trainer saves and resumes from: its arguments (checkpoint folder, steps, DeepSpeed settings), which
checkpoint is complete (one rule: resume, the NaN guard's "last good checkpoint"), and a full disk named as such."""
from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any

from unconfuse.eval.folders import RunDirError
from unconfuse.train.config import TrainSettings


def trainer_arguments(run: Any, train: TrainSettings, model_width: int | None = None) -> dict[str, Any]:
    """TrainingArguments keywords from the shared training settings, the run directory and the launch.
    ``model_width``: for models without a transformers config (open_clip), the width DeepSpeed's ``auto``
    bucket sizes are computed from, as transformers computes them from ``config.hidden_size``."""
    launch = dict(run.launch)
    if launch["deepspeed"] and model_width:
        launch["deepspeed"] = deepspeed_config_for_width(launch["deepspeed"], model_width)
    return dict(output_dir=str(run.dir / "checkpoints"), max_steps=train.max_steps,
                per_device_train_batch_size=2 * train.pairs_per_batch, learning_rate=train.learning_rate,
                weight_decay=train.weight_decay, warmup_steps=train.warmup_steps, lr_scheduler_type=train.lr_scheduler,
                gradient_accumulation_steps=train.gradient_accumulation_steps, max_grad_norm=train.max_grad_norm,
                logging_steps=train.logging_steps, save_strategy="steps", save_steps=train.save_steps,
                save_total_limit=train.save_total_limit, seed=train.seed,
                data_seed=train.seed, bf16=train.bf16, activation_checkpointing=train.activation_checkpointing, report_to=["wandb"] if run.wandb is not None else [],
                dataloader_num_workers=0, disable_tqdm=True, logging_nan_inf_filter=False,  # NonFiniteGuard stops instead
                **launch)  # ConsoleLog shows progress


def deepspeed_config_for_width(path: str, width: int) -> dict[str, Any]:
    """The DeepSpeed config at ``path`` with its width-based ``auto`` ZeRO settings filled in (transformers'
    own rule: reduce bucket width^2, ZeRO-3 prefetch bucket 0.9 width^2, persistence threshold 10 width)."""
    config = json.loads(Path(path).read_text())
    zero = config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", width * width), ("stage3_prefetch_bucket_size", int(0.9 * width * width)),
                       ("stage3_param_persistence_threshold", 10 * width)):
        if zero.get(key) == "auto":
            zero[key] = value
    return config


LOW_SPACE = 256 * 2**20  # bytes: below this, a failed torch/safetensors write is taken for a full disk


def no_space_error(exc: BaseException, folder: Path) -> RunDirError | None:
    """A one-line RunDirError naming ``folder`` and its free space when ``exc`` (or what caused it) is a full disk;
    None otherwise. torch.save (``inline_container``) and safetensors hide the ENOSPC behind their own errors:
    those count when the folder's disk has less than ``LOW_SPACE`` free."""
    import shutil

    def free_space() -> int:  # asked only of errors that may hide a full disk
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        return shutil.disk_usage(existing).free

    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        full = (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "No space left" in text
        hidden = "inline_container" in text or type(seen).__name__ == "SafetensorError"
        if full or hidden:
            free = free_space()
            if full or free < LOW_SPACE:
                return RunDirError(f"no space left on the disk of {folder} ({free / 2**20:.0f} MB free): free some and "
                                   f"rerun the same command (it resumes from the last complete checkpoint)")
        seen = seen.__cause__ or seen.__context__
    return None


def checkpoint_step(folder: str | Path) -> int:
    """The optimizer steps a checkpoint holds (its trainer_state.json's ``global_step``)."""
    return int(json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"])


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_complete(folder: Path) -> bool:
    """Whether a save of ``folder`` finished: trainer_state.json (the Trainer writes it last) parses, and
    the weights are there (a weights file, every shard of an index, or DeepSpeed's ``global_step*``)."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if any((folder / name).is_file() for name in WEIGHT_FILES) or any(p.is_dir() for p in folder.glob("global_step*")):
        return True
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if shards and all((folder / shard).is_file() for shard in shards):
            return True
    return False


def numbered_checkpoints(folder: Path) -> list[Path]:
    """The Trainer's ``checkpoint-N`` folders of ``folder``, newest first."""
    return sorted((p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def latest_complete_checkpoint(folder: Path, quiet: bool = False) -> str | None:
    """``resume_from_checkpoint: auto`` / ``latest``: the newest complete ``checkpoint-N`` of ``folder`` (a save
    killed half-way leaves an incomplete one, skipped with a note); None, training from the start, when there is
    none (said unless ``quiet`` and there is no checkpoint at all: a fresh run)."""
    numbered = numbered_checkpoints(folder)
    for candidate in numbered:
        if checkpoint_complete(candidate):
            return str(candidate)
        print(f"resume_from_checkpoint: skipping {candidate} (incomplete: a save did not finish)", file=sys.stderr)
    if numbered or not quiet:
        print(f"resume_from_checkpoint: no complete checkpoint in {folder}; training from the start", file=sys.stderr)
    return None
