"""Image loading: JPEG/PNG through PIL, DICOM through pydicom (LUTs, windowing, MONOCHROME1)."""
from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .pairs import Benchmark

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
DECODE_TIMEOUT_S = 60.0  # per image: a stalled network mount or a pathological file must not hang the check


class UnreadableImage(ValueError):
    """An image file that cannot be used; the message says why (missing, not a regular file, ...)."""


def is_dicom(path: str | Path) -> bool:
    """DICOM by suffix, or by the 'DICM' magic at byte 128 (files without a suffix are common)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def dicom_to_rgb(path: str | Path, frame: int | None = None) -> Image.Image:
    """Read a DICOM file as an 8-bit RGB image.

    Grayscale: modality LUT (rescale slope/intercept), then the VOI LUT or window from the file
    (min-max when it has none), MONOCHROME1 inverted so that bone is bright. Colour: palette
    lookup for PALETTE COLOR; RGB/YBR come out as RGB from pydicom. Multi-frame: the middle frame
    unless ``frame`` is given.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames > 1:
        arr = arr[n_frames // 2 if frame is None else frame]
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        samples = 3
    if samples == 1:
        values = apply_modality_lut(arr, ds)
        has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        if has_voi:
            values = apply_voi_lut(values, ds, prefer_lut=True)
        values = values.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low)
        if photometric == "MONOCHROME1":
            scaled = 1.0 - scaled
        gray = np.round(scaled * 255.0).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:  # 16-bit colour: scale each file's range to 8 bits
        arr = arr.astype(np.float64)
        arr = np.round(255.0 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)).astype(np.uint8)
    return Image.fromarray(arr[..., :3], mode="RGB")


def load_image(path: str | Path) -> Image.Image:
    """Any supported image file as PIL RGB."""
    if is_dicom(path):
        return dicom_to_rgb(path)
    with Image.open(path) as img:
        return img.convert("RGB")


@dataclass
class ImageProblem:
    pair_id: str
    side: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"pair {self.pair_id} image {self.side}: {self.path}: {self.reason}"


def decode_image(path: str | Path, timeout_s: float = DECODE_TIMEOUT_S) -> Image.Image:
    """``load_image``, fully decoded, for files that may be bad: special files (a FIFO named ``x.png``
    would block) are refused before opening, and decoding gives up after ``timeout_s``. Raises
    ``UnreadableImage`` with the reason."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UnreadableImage("missing") from None
    except OSError as exc:
        raise UnreadableImage(f"unreadable ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UnreadableImage("not a regular file")
    outcome: list = []

    def decode() -> None:
        try:
            outcome.append(load_image(path))  # convert("RGB") decodes every pixel: truncated files fail here
        except Exception as exc:  # any decoder error means unreadable; say which
            outcome.append(UnreadableImage(f"unreadable ({type(exc).__name__}: {exc})"))

    # a daemon thread: one that never returns is abandoned, and does not keep the process alive
    worker = threading.Thread(target=decode, daemon=True, name=f"decode {Path(path).name}")
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise UnreadableImage(f"not decoded within {timeout_s:g} s")
    if isinstance(outcome[0], UnreadableImage):
        raise outcome[0]
    return outcome[0]


def check_images(benchmark: Benchmark, timeout_s: float = DECODE_TIMEOUT_S) -> list[ImageProblem]:
    """Every missing, special or undecodable image of the benchmark, all at once. Each image is
    decoded in full (header checks pass truncated files), so bad input fails before any model loads."""
    problems: list[ImageProblem] = []
    status: dict[str, str | None] = {}
    for pair in benchmark.pairs:
        for side in (1, 2):
            ref = pair.image(side)
            if ref not in status:
                status[ref] = image_problem(benchmark.resolve_image(ref), timeout_s)
            if status[ref] is not None:
                problems.append(ImageProblem(pair.id, side, str(benchmark.resolve_image(ref)), status[ref]))
    return problems


def image_problem(path: str | Path, timeout_s: float = DECODE_TIMEOUT_S) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes."""
    try:
        decode_image(path, timeout_s)
    except UnreadableImage as exc:
        return str(exc)
    return None


def pixel_digest(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels and the size: equal for re-encoded copies (PNG <-> lossless
    formats, other metadata), unlike a hash of the file's bytes."""
    import hashlib

    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest()
