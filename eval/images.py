"""Image loading: JPEG/PNG through PIL, DICOM through pydicom (LUTs, windowing, MONOCHROME1)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .pairs import Benchmark

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


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


def check_images(benchmark: Benchmark) -> list[ImageProblem]:
    """Every missing or unreadable image of the benchmark, all at once (cheap header checks)."""
    problems: list[ImageProblem] = []
    status: dict[str, str | None] = {}
    for pair in benchmark.pairs:
        for side in (1, 2):
            ref = pair.image(side)
            if ref not in status:
                status[ref] = _readable(benchmark.resolve_image(ref))
            if status[ref] is not None:
                problems.append(ImageProblem(pair.id, side, str(benchmark.resolve_image(ref)), status[ref]))
    return problems


def _readable(path: Path) -> str | None:
    if not path.exists():
        return "missing"
    try:
        if is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=False, defer_size="1 KB")
            if "PixelData" not in ds:
                return "DICOM file without pixel data"
        else:
            with Image.open(path) as img:
                img.verify()
    except Exception as exc:  # any decoder error means unreadable; say which
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None
