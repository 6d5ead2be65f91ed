"""File writes readers can trust (temp file + rename; atomic folders), JSON lines and content hashes."""
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
