"""No image on both sides of a split: the leakage audit every run writes (``leakage.json``) before it trains, and
the perceptual hashes it and mining share (near-duplicates are reported; copies are a leak)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .images import UnreadableImage, decode_image, load_image, pixel_digest
from .io import atomic_write_json, sha256_file
from .pairs import Benchmark
from .retention import RetentionSet


class LeakageError(RuntimeError):
    """Training images appear in the validation or test pairs."""


def phash_row(image) -> np.ndarray:
    """The 64-bit perceptual hash (``imagehash.phash``) of a PIL image as one row of 8 bytes."""
    import imagehash

    return np.packbits(imagehash.phash(image).hash.flatten())


def phash_rows(paths: list[Path]) -> np.ndarray:
    """The perceptual hashes of the images at ``paths`` as rows of 8 bytes (0 rows for no path)."""
    return np.stack([phash_row(load_image(p)) for p in paths]) if paths else np.zeros((0, 8), np.uint8)


def min_hamming(a: np.ndarray, b: np.ndarray, block: int = 4096) -> np.ndarray:
    """For each row of ``a`` (packed 64-bit hashes), the smallest Hamming distance to a row of ``b``."""
    out = np.empty(len(a), dtype=np.int64)
    for start in range(0, len(a), block):
        xor = np.bitwise_xor(a[start:start + block, None, :], b[None, :, :])
        out[start:start + block] = np.bitwise_count(xor).sum(axis=-1, dtype=np.int64).min(axis=1)
    return out


ImageSource = Benchmark | RetentionSet  # pairs, or single images (retention and replay sets)


def _image_paths(source: ImageSource) -> dict[str, str]:
    """Resolved path -> reference of every image of a benchmark or a retention/replay set, each once."""
    refs = source.unique_images() if isinstance(source, Benchmark) else dict.fromkeys(item.image for item in source.items)
    return {str(source.resolve_image(ref).resolve()): ref for ref in refs}


def leakage_audit(train: ImageSource, others: dict[str, ImageSource], phash_distance: int = 4,
                  decoded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training images found in the other splits: by resolved path, by file bytes (sha256) and by decoded
    pixels (a re-encoded copy has other bytes, the same pixels): each one a leak. Near-duplicates by
    perceptual hash (Hamming distance <= ``phash_distance``, as mining uses) are reported, not a leak:
    similar scans of different patients are common. ``decoded``: path -> (pixel digest, phash), shared by
    audits of the same images (each image is decoded once)."""
    decoded = {} if decoded is None else decoded

    def pixels(path: str) -> tuple[str, np.ndarray] | None:
        """(pixel digest, packed 64-bit phash), or None for a file that does not decode (the image check names it)."""
        if path not in decoded:
            try:
                image = decode_image(path)
                decoded[path] = (pixel_digest(image), phash_row(image))
            except UnreadableImage:
                decoded[path] = None
        return decoded[path]

    def file_hash(path: str) -> str | None:
        return sha256_file(path) if Path(path).is_file() else None  # a FIFO would block the read

    train_paths = _image_paths(train)
    train_hashes = {file_hash(p) for p in train_paths} - {None}
    train_pixels = {d[0]: p for p in train_paths if (d := pixels(p)) is not None}
    phash_paths = [p for p in train_paths if pixels(p) is not None]
    train_phash = np.stack([pixels(p)[1] for p in phash_paths]) if phash_paths else np.zeros((0, 8), np.uint8)
    report: dict[str, Any] = {"train_images": len(train_paths), "phash_distance": phash_distance, "splits": {}}
    for name, bench in others.items():
        paths = _image_paths(bench)
        by_id = sorted(set(paths) & set(train_paths))
        by_hash = sorted(p for p in paths if p not in train_paths and file_hash(p) in train_hashes)
        by_pixels, near = [], []
        for p in sorted(set(paths) - set(train_paths) - set(by_hash)):
            d = pixels(p)
            if d is None:
                continue
            if d[0] in train_pixels:
                by_pixels.append(p)
            elif len(train_phash):
                distances = np.bitwise_count(np.bitwise_xor(train_phash, d[1])).sum(axis=1)
                nearest = int(distances.argmin())
                if distances[nearest] <= phash_distance:
                    near.append({"image": p, "train_image": phash_paths[nearest], "distance": int(distances[nearest])})
        report["splits"][name] = {"images": len(paths), "shared_by_id": by_id, "shared_by_content": by_hash,
                                  "shared_by_pixels": by_pixels, "near_duplicates_phash": near}
    report["leak"] = any(v["shared_by_id"] or v["shared_by_content"] or v["shared_by_pixels"]
                         for v in report["splits"].values())
    return report


def _shared(report: dict[str, Any]) -> dict[str, int]:
    return {k: len(v["shared_by_id"]) + len(v["shared_by_content"]) + len(v["shared_by_pixels"])
            for k, v in report["splits"].items()}


def check_leakage(run_dir: Path, train: Benchmark, others: dict[str, Benchmark], allow: bool, write: bool = True,
                  held_out: dict[str, RetentionSet | None] | None = None, replay: RetentionSet | None = None) -> dict[str, Any]:
    """Write ``leakage.json``; abort before training on a leak unless ``allow``. The training pairs are audited
    against ``others`` (val, test) and the ``held_out`` retention sets; the ``replay`` set, when there is one,
    against all of them (its own section, ``replay``: general data must not hold an image the run is judged on)."""
    held = {name: rset for name, rset in (held_out or {}).items() if rset is not None}
    decoded: dict[str, Any] = {}  # the judged images are decoded once for both audits
    report = leakage_audit(train, {**others, **held}, decoded=decoded)
    if replay is not None:
        report["replay"] = leakage_audit(replay, {**others, **held}, decoded=decoded)
        report["leak"] = report["leak"] or report["replay"]["leak"]
    report["allowed"] = allow
    if write:
        atomic_write_json(run_dir / "leakage.json", report)
    if report["leak"] and not allow:
        where = [f"training images appear in other splits {_shared(report)}"] if any(_shared(report).values()) else []
        if replay is not None and report["replay"]["leak"]:
            where.append(f"replay images (data.replay) appear in {_shared(report['replay'])}")
        raise LeakageError(f"{'; '.join(where)}; see {run_dir / 'leakage.json'} (set allow_leakage: true to train anyway)")
    return report
