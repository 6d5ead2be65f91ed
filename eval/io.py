"""Small file helpers: atomic writes (temp file + rename), atomic folders and content hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no other way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[Any]:
    """A binary file to write ``path`` through: readers see the old file or the whole new one, never
    half (a temporary sibling, synced, then renamed over ``path``; removed if the block fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give, not the temp file's 600: a group can read results
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_folder(folder: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Write a folder's files into a temporary sibling, then swap it in whole: readers see the old
    folder or the complete new one, never half. On error the temporary folder is removed and the
    old one stays. ``keep_existing``: if ``folder`` appeared meanwhile (another process built it),
    keep that one and discard ours."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.building-"))
    os.chmod(tmp, 0o777 & ~_umask())  # what mkdir would give, not the temp folder's 700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        if keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        stale = folder.parent / f".{folder.name}.stale-{os.getpid()}"
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process swapped its copy in between: keep that one
        shutil.rmtree(tmp, ignore_errors=True)


def json_lines(lines, path: str | Path, error: type[Exception]) -> Iterator[tuple[int, str, Any]]:
    """(line number, ``"<path>: line N"``, parsed value) for every non-blank line of a JSONL text; a line
    that is not JSON raises ``error`` naming it."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not JSON ({exc.msg})") from exc
        yield lineno, where, value


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
