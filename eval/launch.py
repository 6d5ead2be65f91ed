"""Running under ``accelerate launch``: the one launcher behind ``unconfuse train --launch`` and
``unconfuse eval --launch``, and what a launched process needs to know (its rank, device, barriers)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

EXIT_STATUS_ENV = "UNCONFUSE_EXIT_STATUS_FILE"


def read_accelerate_config(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def accelerate_command(module: str, accelerate_config: str | Path, argv: list[str]) -> list[str]:
    """``python -m accelerate.commands.launch --config_file ACCEL [--multi_gpu] -m MODULE ARGV``.

    On a machine without GPUs, DDP (``MULTI_GPU``) configs need ``--multi_gpu`` to start real
    processes (``--cpu`` starts one); the processes then run on the CPU and talk over gloo.
    """
    import torch

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
    if not torch.cuda.is_available() and read_accelerate_config(accelerate_config).get("distributed_type") == "MULTI_GPU":
        command.append("--multi_gpu")
    return [*command, "-m", module, *argv]


def accelerate_launch(module: str, accelerate_config: str | Path, argv: list[str]) -> int:
    """Run ``python -m MODULE ARGV`` in every process ``accelerate_config`` starts; the command's exit status.

    accelerate launch turns any failing process into exit 1: a process that fails with a status of
    its own (2: bad input, 3: a diverged run) leaves it in a file (``record_exit_status``), and that
    is what this returns.
    """
    with tempfile.TemporaryDirectory(prefix="unconfuse-launch-") as tmp:
        status_file = Path(tmp) / "exit_status"
        process = subprocess.Popen(accelerate_command(module, accelerate_config, argv),
                                   env={**os.environ, EXIT_STATUS_ENV: str(status_file)})
        with forwarded_signals(process):
            returncode = process.wait()
        recorded = status_file.read_text().strip() if status_file.exists() else ""
    return int(recorded) if returncode and recorded.isdigit() else returncode


@contextlib.contextmanager
def forwarded_signals(process: subprocess.Popen) -> Iterator[None]:
    """While the block runs, a SIGTERM or SIGINT to this process is sent on, as SIGTERM, to the processes
    ``accelerate launch`` started (each saves at its next clean point, together: ``unconfuse.eval.stopping``),
    not to accelerate's launcher, whose own handler would kill them after a fixed 30 s grace."""
    import signal

    import psutil

    from .signals import installed_handlers

    def forward(signum, frame):
        try:
            workers = psutil.Process(process.pid).children()
        except psutil.NoSuchProcess:
            return
        for worker in workers or [psutil.Process(process.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.send_signal(signal.SIGTERM)

    with installed_handlers(forward):
        yield


def record_exit_status(status: int) -> None:
    """Leave ``status`` where ``accelerate_launch`` reads it (nothing when this process was not started by it)."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if path:
        Path(path).write_text(str(status))


@dataclass(frozen=True)
class LaunchState:
    """This process's place in a launch: process ``rank`` of ``processes`` (0 of 1 when not launched)."""

    rank: int = 0
    processes: int = 1
    device: str | None = None  # cuda:<local rank>, or cpu, under a launch; None: the model's default

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """A barrier: return once every process got here."""
        if self.processes > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first, the others after it (one process builds what all need)."""
        if not self.is_main:
            self.wait()
        yield
        if self.is_main:
            self.wait()


def launch_state() -> LaunchState:
    """This process's ``LaunchState``. Under a launch of several processes this creates the distributed
    state (do it before any model loads): on a machine without GPUs, CPU processes over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return LaunchState()
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    # a process with less to answer waits for the others at the gather: longer than NCCL's default 10 minutes
    state = PartialState(cpu=not cuda, timeout=timedelta(hours=2))
    return LaunchState(state.process_index, state.num_processes, f"cuda:{state.local_process_index}" if cuda else "cpu")
