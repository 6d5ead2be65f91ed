"""A six-pair benchmark of real radiology images that install with pydicom and pydicom-data.

Not MediConfusion: a small benchmark in its format (same question, two options, different answers
per image, balanced answers), so that ``unconfuse eval`` has real DICOM and PNG images to read
offline. Most images stay DICOM (exercising windowing and MONOCHROME1); the large radiograph and
the ultrasound are written as PNG.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..io import atomic_write_json
from ..pairs import Pair, write_jsonl
from .generator import SOURCES

# image name -> (world source whose pydicom file it is, output format)
SAMPLE_IMAGES = {
    "ct_head": ("ct_head", "dcm"),
    "ct_spine": ("ct_spine", "dcm"),
    "mr_head": ("mr_brain", "dcm"),
    "mr_shoulder": ("mr_shoulder", "dcm"),
    "mr_abdomen": ("mr_abdomen", "dcm"),
    "nm_whole_body": ("nm_body", "dcm"),
    "cr_chest": ("cr_chest", "png"),
    "cr_leg": ("cr_leg", "dcm"),
    "us_neck": ("us_neck", "png"),
}
SOURCE_FILES = {s.name: s.file for s in SOURCES}

MODALITY_Q = "What imaging modality is shown?"
SAMPLE_PAIRS = [
    # id, image_1, image_2, question, option A, option B, answers, categories
    ("s001", "ct_head", "mr_head", MODALITY_Q, "Computed tomography", "Magnetic resonance imaging", "AB",
     ["Cerebral"], ["Cerebral"]),
    ("s002", "mr_shoulder", "ct_spine", MODALITY_Q, "Computed tomography", "Magnetic resonance imaging", "BA",
     ["Musculoskeletal"], ["Spinal"]),
    ("s003", "cr_chest", "us_neck", "Is this a radiograph or an ultrasound image?", "Radiograph", "Ultrasound", "AB",
     ["Pulmonary"], ["Head and Neck"]),
    ("s004", "cr_leg", "cr_chest", "Which body region is imaged?", "Chest", "Lower limb", "BA",
     ["Musculoskeletal"], ["Pulmonary"]),
    ("s005", "nm_whole_body", "mr_abdomen", "What kind of study is this?", "Whole-body nuclear medicine bone scan",
     "Abdominal magnetic resonance image", "AB", ["Nuclear Medicine"], ["Gastrointestinal"]),
    ("s006", "mr_abdomen", "ct_head", "Does this image show the abdomen?", "No", "Yes", "BA",
     ["Gastrointestinal"], ["Cerebral"]),
]


def write_sample_benchmark(out: str | Path, max_png_size: int = 512) -> Path:
    """Write ``out/pairs.jsonl`` and ``out/images/``; idempotent. Returns ``out``."""
    from pydicom.data import get_testdata_file

    from ..images import dicom_to_rgb

    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, (source, fmt) in SAMPLE_IMAGES.items():
        target = images / f"{name}.{fmt}"
        names[name] = f"images/{target.name}"
        if target.exists():
            continue
        path = get_testdata_file(SOURCE_FILES[source])
        if path is None:
            raise FileNotFoundError(f"pydicom test file {source} not found; is pydicom-data installed?")
        tmp = target.with_suffix(target.suffix + ".tmp")
        if fmt == "dcm":
            shutil.copyfile(path, tmp)
        else:
            img = dicom_to_rgb(path)
            img.thumbnail((max_png_size, max_png_size))
            img.save(tmp, format="PNG")
        tmp.replace(target)
    pairs = [Pair(id=pid, image_1=names[a], image_2=names[b], question=q, option_a=oa, option_b=ob,
                  answer_1=ans[0], answer_2=ans[1], categories_1=c1, categories_2=c2, source="pydicom-sample")
             for pid, a, b, q, oa, ob, ans, c1, c2 in SAMPLE_PAIRS]
    write_jsonl(pairs, out / "pairs.jsonl")
    atomic_write_json(out / "sample.json", {"images": {k: SOURCE_FILES[v[0]] for k, v in SAMPLE_IMAGES.items()},
                                            "n_pairs": len(pairs)})
    return out
