"""Stopping on a signal without losing work: what a cluster does to a run (Slurm sends SIGTERM on preemption,
on ``scontrol requeue`` and ahead of a time limit with ``--signal``; a user presses Ctrl-C).

Inside ``graceful_stop()`` SIGTERM and SIGINT do not kill the process. Where a run can stop cleanly (after
an optimizer step, after a batch of answers) it asks ``stop_requested()``, finishes what it was doing,
saves, and raises ``Stopped``; elsewhere (loading a model, scoring a stage) the signal raises ``Stopped`` at
once (files are written atomically, so nothing half-written is left). The command line prints its one line
and exits with ``Stopped.status``: 143 for SIGTERM, 130 for SIGINT (128 + the signal, as a shell reports a
process killed by it), which a requeue script can test. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from .signals import installed_handlers


class Stopped(Exception):
    """The run stopped on a signal; the message says where and what was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _Stop:
    requested: int | None = None  # the signal received, once one was
    deferring: int = 0  # > 0: inside a loop that stops at its next clean point
    installed: bool = False


_STOP = _Stop()


def _handle(signum, frame) -> None:
    first = _STOP.requested is None
    if first:
        _STOP.requested = signum
    if _STOP.deferring and (first or signum != signal.SIGINT):
        return  # the loop stops at its next clean point (a repeated SIGTERM, e.g. a launcher's, changes nothing)
    raise Stopped(signum, f"stopped by {signal_name(signum)}; nothing half-written is kept; rerun the same command to resume")


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """SIGTERM and SIGINT raise ``Stopped`` (or, inside ``deferred()``, wait for the next clean point) for the
    block's duration; the previous handlers afterwards. Nothing is installed off the main thread."""
    if _STOP.installed:
        yield
        return
    with installed_handlers(_handle) as installed:
        _STOP.requested, _STOP.installed = None, installed
        try:
            yield
        finally:
            _STOP.requested, _STOP.installed, _STOP.deferring = None, False, 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a signal only sets ``stop_requested()``: the loop stops at its next clean point.
    A signal that came before the block raises ``Stopped`` on entry."""
    if _STOP.requested is not None:
        raise Stopped(_STOP.requested, f"stopped by {signal_name(_STOP.requested)}; rerun the same command to resume")
    _STOP.deferring += 1
    try:
        yield
    finally:
        _STOP.deferring -= 1


def stop_requested() -> int | None:
    """The signal received (SIGTERM or SIGINT), or None."""
    return _STOP.requested


def report_stopped(exc: Stopped) -> int:
    """A command line's end after ``Stopped``: its one line, and its status (also where ``--launch`` reads it)."""
    import sys

    from .launch import record_exit_status

    print(str(exc), file=sys.stderr, flush=True)
    record_exit_status(exc.status)
    return exc.status
