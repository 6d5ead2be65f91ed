"""Job functions for tests/test_jobs.py: importable by name (``tests.jobs_work``), so that a
spawned worker process can run them."""
import os
import time
from pathlib import Path


def meet(folder: str, me: str, other: str, timeout: float = 60.0) -> dict:
    """Leave a mark, then wait for ``other``'s: returns only when both jobs run at the same time."""
    import torch

    Path(folder, me).touch()
    deadline = time.time() + timeout
    while not Path(folder, other).exists():
        if time.time() > deadline:
            raise TimeoutError(f"{me}: {other} never ran beside it")
        time.sleep(0.05)
    print(f"{me} met {other}\npartial line without newline", end="")
    return {"pid": os.getpid(), "threads": torch.get_num_threads()}


def record(log: str, name: str) -> str:
    """Append ``name`` to ``log`` (the order jobs ran in) and print a line."""
    with open(log, "a") as f:
        f.write(name + "\n")
    print(f"ran {name}")
    return name


def fail(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def die() -> None:
    """The worker process is killed (as the kernel's OOM killer would)."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
