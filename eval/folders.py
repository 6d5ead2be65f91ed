"""Run folders a command owns or joins: one writer at a time (a lock naming its holder), what the folder holds
recorded as a fingerprint (settings, model identity, data content), the same run resumed and another refused
unless forced (its contents moved aside, never deleted)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .io import atomic_write_json


class RunDirError(ValueError):
    """A folder a command would write holds something else, or another process is writing it."""


FINGERPRINT = "fingerprint.json"
LOCK = ".unconfuse.lock"
JOIN_LOCK = ".unconfuse.join.lock"  # join_folder's, apart from the writer's LOCK held for a whole run


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(new) + [k for k in old if k not in new]  # in the fingerprint's order: settings first
        return [d for key in keys for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [f"{prefix or 'value'}: {json.dumps(old)[:60]} then {json.dumps(new)[:60]}"]


def join_folder(folder: str | Path, fingerprint: dict[str, Any], *, what: str = "run") -> Path:
    """Join ``folder`` as one of several jobs that write it side by side (the folds of one cv, each
    of which owns its own subfolder): without a lock, refuse a folder that holds another fingerprint
    (or files of something else), and record ``fingerprint`` when the folder has none yet. Jobs of
    the same settings write the same record, so their order does not matter. Raises ``RunDirError``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder} is a file; give a folder (new or holding this same {what})")
    import fcntl

    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / JOIN_LOCK, "a+", encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write to {folder}: {exc.strerror or exc}") from exc
    with handle:  # held for the check and the record only: jobs starting together take turns
        fcntl.flock(handle, fcntl.LOCK_EX)
        old, reason = _held_by_another(folder, fingerprint, what)
        if reason:
            raise RunDirError(f"{folder} {reason}; give every job of it the same settings, or use another folder")
        if old is None:
            atomic_write_json(folder / FINGERPRINT, fingerprint)
    return folder


UNREADABLE = object()  # a fingerprint.json that does not parse: it cannot show which run the folder holds


def read_fingerprint(record: Path) -> Any:
    """The fingerprint a folder records: None when it has none, ``UNREADABLE`` when the file does not parse."""
    if not record.exists():
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return UNREADABLE


def _held_by_another(folder: Path, fingerprint: dict[str, Any], what: str) -> tuple[Any, str | None]:
    """The fingerprint ``folder`` records (None when it has none), and why the folder cannot take
    ``fingerprint``: it holds another run (its differences named), or files that are no unconfuse run."""
    record = folder / FINGERPRINT
    old = read_fingerprint(record)
    if old is UNREADABLE:
        return old, f"has an unreadable {FINGERPRINT} (cut short or not JSON)"
    if old is not None and old != fingerprint:
        changed = _differences(old, fingerprint)
        return old, f"holds another {what} ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''})"
    others = [p for p in folder.iterdir() if p.name not in (LOCK, JOIN_LOCK)] if old is None else []
    if others:
        return old, f"is not empty and holds no unconfuse {what} ({len(others)} entries, e.g. {others[0].name})"
    return old, None


@contextlib.contextmanager
def owned_folder(folder: str | Path, fingerprint: dict[str, Any], *, force: bool = False, what: str = "run",
                 writer: bool = True) -> Iterator[Path]:
    """Own ``folder`` for a command's whole run.

    The writer holds an exclusive lock on it (a second writer is refused, naming the holder) and
    records ``fingerprint`` (what the run computes: resolved settings, model identity, data content)
    in ``fingerprint.json``. A folder holding the same fingerprint is resumed; one holding another, or
    files of something else, is refused, unless ``force``: then its contents are moved aside into a
    sibling ``<name>.replaced-<time>`` (nothing is deleted) and the run starts afresh; so is a folder holding this
    same run finished (its ``results.json`` written): ``force`` redoes it. Processes of a
    multi-process launch other than the writer (``writer=False``) take the same decision without
    writing. Raises ``RunDirError`` with a one-line message.
    """
    import fcntl
    import itertools
    import sys
    import time

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder} is a file; give a folder (new or holding this same run)")
    record = folder / FINGERPRINT
    if not writer:
        old = read_fingerprint(record)
        if old is not None and old != fingerprint and not force:
            raise RunDirError(f"{folder} holds another {what}; use another folder, or --force")
        yield folder
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a+", encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write to {folder}: {exc.strerror or exc}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirError(f"{folder} is being written by {holder}; wait for it to finish or use another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[:3])}, since {time.strftime('%H:%M:%S')})")
        handle.flush()
        old, reason = _held_by_another(folder, fingerprint, what)
        if not reason and force and (folder / "results.json").exists():  # this same run, finished: --force redoes it
            reason = f"holds this {what}, finished"
        if reason:
            if not force:
                # only a readable record of another run can be resumed (by its own settings)
                resume = "rerun with the same settings to resume it, " if isinstance(old, dict) else ""
                raise RunDirError(f"{folder} {reason}; {resume}use another folder, or --force to start afresh "
                                  "(the old contents are moved aside, not deleted)")
            stamp = time.strftime('%Y%m%d-%H%M%S')
            aside = folder.parent / f"{folder.name}.replaced-{stamp}"
            for n in itertools.count(2):  # two --force runs within a second get two folders
                try:
                    aside.mkdir()
                    break
                except FileExistsError:
                    aside = folder.parent / f"{folder.name}.replaced-{stamp}-{n}"
            for path in [p for p in folder.iterdir() if p.name not in (LOCK, JOIN_LOCK)]:
                os.replace(path, aside / path.name)
            print(f"--force: the old contents of {folder} are in {aside}", file=sys.stderr)
        atomic_write_json(record, fingerprint)
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_HELD: dict[str, contextlib.ExitStack] = {}  # folders this process holds (hold_folder) -> the open ownership


def hold_folder(folder: str | Path, fingerprint: dict[str, Any], *, force: bool = False, what: str = "run",
                writer: bool = True) -> None:
    """``owned_folder`` held beyond a block: until ``release_folder`` or the process ends (a run owns its
    folder across the steps of its lifecycle). A folder this process already holds is released and owned afresh
    (an in-process retry)."""
    release_folder(folder)
    stack = contextlib.ExitStack()
    stack.enter_context(owned_folder(folder, fingerprint, force=force, what=what, writer=writer))
    _HELD[str(Path(folder).resolve())] = stack


def release_folder(folder: str | Path) -> None:
    """Let go of a folder ``hold_folder`` took (nothing when this process does not hold it)."""
    stack = _HELD.pop(str(Path(folder).resolve()), None)
    if stack is not None:
        stack.close()
