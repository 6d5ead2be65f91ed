"""The embedded world: a small MediConfusion-format benchmark built from real radiology images.

Real images that install from PyPI (pydicom's and pydicom-data's DICOM files, scikit-image's
Shepp-Logan phantom) become many distinct *base images* (frames, crops, scales, flips, intensity
and noise changes), each tagged with modality, anatomy and MediConfusion categories. Findings are
drawn procedurally with exact ground truth (focal lesions: side, height, size, count, brighter or
darker than the tissue, blended with the local intensity; linear structures). A confusing pair is
two different base images of the same source (globally alike) with one question and two options
whose correct answers differ. Captions always say modality and anatomy, and the finding only with
a small probability: an encoder pretrained on them learns global appearance and misses findings,
the mechanism behind MediConfusion.

Splits are disjoint in base images. The same settings give byte-identical output; ``world.json``
records every file's sha256, so a half-written world is detected and rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..home import default_world_root, unconfuse_home
from ..io import atomic_folder, atomic_write_text, sha256_file

WORLD_VERSION = 1
SPLITS = ("train", "val", "test")


class WorldError(ValueError):
    """The world cannot be built with these settings; the message names the cause."""


@dataclass(frozen=True)
class Source:
    name: str
    file: str  # pydicom test file, or "skimage:shepp_logan_phantom"
    modality: str
    anatomy: str
    categories: tuple[str, ...]


SOURCES = (
    Source("cr_chest", "RG1_UNCR.dcm", "X-ray", "chest", ("Pulmonary",)),
    Source("cr_leg", "RG3_UNCR.dcm", "X-ray", "leg", ("Musculoskeletal",)),
    Source("ct_head", "693_UNCR.dcm", "CT", "head", ("Cerebral",)),
    Source("ct_spine", "CT_small.dcm", "CT", "spine", ("Spinal",)),
    Source("mr_brain", "emri_small.dcm", "MRI", "brain", ("Cerebral",)),
    Source("mr_shoulder", "MR2_UNCR.dcm", "MRI", "shoulder", ("Musculoskeletal",)),
    Source("mr_abdomen", "MR-SIEMENS-DICOM-WithOverlays.dcm", "MRI", "abdomen", ("Gastrointestinal",)),
    Source("us_neck", "US1_UNCR.dcm", "ultrasound", "neck", ("Head and Neck",)),
    Source("nm_body", "JPEG2000_UNC.dcm", "nuclear medicine scan", "whole body", ("Nuclear Medicine",)),
    Source("ct_phantom", "skimage:shepp_logan_phantom", "CT", "head phantom", ("Cerebral",)),
)

# question type -> (question, option for value 0, option for value 1). Options are phrases that the
# finding captions also use, so an encoder that learned findings from captions can match them.
QUESTIONS = {
    "side": ("Which side of the image is the lesion on?", "on the left side", "on the right side"),
    "height": ("Is the lesion in the upper or the lower half of the image?", "in the upper half", "in the lower half"),
    "presence": ("Is there a focal lesion in this image?", "a focal lesion is present", "no focal lesion"),
    "count": ("How many focal lesions are visible?", "one lesion", "two lesions"),
    "size": ("How large is the lesion?", "a small lesion", "a large lesion"),
    "brightness": ("Is the lesion brighter or darker than the surrounding tissue?", "a bright lesion", "a dark lesion"),
    "line": ("Is there a linear structure, such as a fracture line or a catheter?", "a linear structure is present",
             "no linear structure"),
}


@dataclass
class WorldConfig:
    """Settings of a world; every field goes into world.json and into the world's identity."""

    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    pairs: int = field(default=320, metadata={"help": "pairs over train/val/test (60/15/25%)"})
    image_size: int = field(default=64, metadata={"help": "pixels per side"})
    bases_per_source: int = field(default=24, metadata={"help": "distinct base images made from each source"})
    max_pairs_per_base: int = field(default=6, metadata={"help": "pairs a base image takes part in, at most"})
    corpus_size: int = field(default=2000, metadata={"help": "image-caption records of corpus.jsonl"})
    finding_caption_prob: float = field(default=0.05, metadata={
        "help": "how often a corpus caption names the finding (low: encoders learn to miss findings)"})
    split_fractions: tuple[float, float, float] = field(default=(0.6, 0.15, 0.25), metadata={
        "help": "fractions of pairs and base images for train, val and test", "metavar": ("TRAIN", "VAL", "TEST")})
    question_types: tuple[str, ...] = field(default=tuple(QUESTIONS), metadata={
        "help": f"kinds of question the pairs ask ({', '.join(QUESTIONS)})", "choices": tuple(QUESTIONS),
        "metavar": "TYPE"})
    sources: tuple[str, ...] = field(default=tuple(s.name for s in SOURCES), metadata={
        "help": f"real images the base images are made from ({', '.join(s.name for s in SOURCES)})",
        "choices": tuple(s.name for s in SOURCES), "metavar": "SOURCE"})

    def identity(self) -> str:
        data = json.dumps({"version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Sources and base images


def load_source(source: Source) -> np.ndarray:
    """A source as float grayscale in [0, 1], frames first (F, H, W)."""
    if source.file.startswith("skimage:"):
        try:
            from skimage import data as skdata
        except ImportError as exc:
            raise WorldError("the Shepp-Logan phantom source needs scikit-image (pip install scikit-image), "
                             "or leave ct_phantom out of the world's sources") from exc
        return np.asarray(skdata.shepp_logan_phantom(), dtype=np.float64)[None]
    import pydicom
    from pydicom.data import get_testdata_file

    from ..images import dicom_to_rgb

    path = get_testdata_file(source.file)
    if path is None:
        raise WorldError(f"pydicom test file {source.file} not found: is pydicom-data installed?")
    n_frames = int(getattr(pydicom.dcmread(path, stop_before_pixels=True), "NumberOfFrames", 1) or 1)
    frames = [np.asarray(dicom_to_rgb(path, frame=f).convert("L"), dtype=np.float64) / 255.0 for f in range(n_frames)]
    return np.stack(frames)


@dataclass
class BaseImage:
    id: str
    source: Source
    pixels: np.ndarray  # (S, S) float in [0, 1]


def make_base_images(cfg: WorldConfig, rng: np.random.Generator) -> list[BaseImage]:
    """Distinct base images per source: frame, crop, scale, flip, gamma, contrast and noise."""
    from PIL import Image

    by_name = {s.name: s for s in SOURCES}
    unknown = [n for n in cfg.sources if n not in by_name]
    if unknown:
        raise WorldError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    bases = []
    size = cfg.image_size
    for name in cfg.sources:
        source = by_name[name]
        frames = load_source(source)
        _, height, width = frames.shape
        for b in range(cfg.bases_per_source):
            frame = frames[rng.integers(len(frames))]
            side = int(min(height, width) * rng.uniform(0.55, 0.95))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            crop = frame[top:top + side, left:left + side]
            img = np.asarray(Image.fromarray((crop * 255).astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)) / 255
            if rng.random() < 0.5:
                img = img[:, ::-1]
            img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
            img = np.clip((img - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05), 0, 1)
            img = np.clip(img + rng.normal(0, rng.uniform(0.005, 0.02), img.shape), 0, 1)
            bases.append(BaseImage(f"{name}-{b:03d}", source, np.ascontiguousarray(img)))
    return bases


def bases_per_split(cfg: WorldConfig) -> dict[str, int]:
    """How many of each source's base images go to each split (at least 2 everywhere)."""
    n_val = max(2, int(round(cfg.bases_per_source * cfg.split_fractions[1])))
    n_test = max(2, int(round(cfg.bases_per_source * cfg.split_fractions[2])))
    n_train = cfg.bases_per_source - n_val - n_test
    if n_train < 2:
        raise WorldError(f"--bases-per-source {cfg.bases_per_source} is too small to give every split two base "
                         "images of each source; use at least 8")
    return {"train": n_train, "val": n_val, "test": n_test}


def pairs_per_split(cfg: WorldConfig) -> dict[str, int]:
    n_val = max(2, int(round(cfg.pairs * cfg.split_fractions[1])))
    n_test = max(2, int(round(cfg.pairs * cfg.split_fractions[2])))
    return {"train": cfg.pairs - n_val - n_test, "val": n_val, "test": n_test}


def check_capacity(cfg: WorldConfig) -> None:
    """Each base image takes part in at most ``max_pairs_per_base`` pairs: fail early, before any image work."""
    if cfg.pairs < 2 * len(SPLITS):
        raise WorldError(f"--pairs {cfg.pairs} is too small: each split needs at least two pairs")
    bases = bases_per_split(cfg)
    for split, n in pairs_per_split(cfg).items():
        capacity = len(cfg.sources) * (bases[split] * cfg.max_pairs_per_base // 2)
        if n > capacity:
            raise WorldError(f"--pairs {cfg.pairs} asks for {n} {split} pairs, but {bases[split]} base images per source "
                             f"x {len(cfg.sources)} sources allow {capacity} (max {cfg.max_pairs_per_base} pairs per base "
                             "image); lower --pairs or raise --bases-per-source")


def split_bases(cfg: WorldConfig, bases: list[BaseImage], rng: np.random.Generator) -> dict[str, list[BaseImage]]:
    """Each source's base images divided among the splits (a random permutation per source)."""
    counts = bases_per_split(cfg)
    splits: dict[str, list[BaseImage]] = {s: [] for s in SPLITS}
    for name in cfg.sources:
        mine = [b for b in bases if b.source.name == name]
        for rank, i in enumerate(rng.permutation(len(mine))):
            split = "val" if rank < counts["val"] else "test" if rank < counts["val"] + counts["test"] else "train"
            splits[split].append(mine[i])
    return splits


# ---------------------------------------------------------------------------------------------
# Findings


def empty_findings() -> dict[str, Any]:
    return {"lesions": [], "line": False}


def random_lesion(rng: np.random.Generator, **fixed: str) -> dict[str, str]:
    lesion = {"side": rng.choice(["left", "right"]), "height": rng.choice(["upper", "lower"]),
              "size": rng.choice(["small", "large"]), "brightness": rng.choice(["bright", "dark"])}
    lesion.update(fixed)
    return {k: str(v) for k, v in lesion.items()}


def findings_for(question: str, value: int, rng: np.random.Generator) -> dict[str, Any]:
    """Findings whose answer to ``question`` is option ``value`` (0 or 1); the rest is random."""
    found = empty_findings()
    if question == "presence":
        found["lesions"] = [random_lesion(rng)] if value == 0 else []
    elif question == "count":
        first = random_lesion(rng)
        found["lesions"] = [first] if value == 0 else [first, random_lesion(
            rng, side="right" if first["side"] == "left" else "left")]
    elif question == "line":
        found["line"] = value == 0
        found["lesions"] = [random_lesion(rng)] if rng.random() < 0.5 else []
    else:
        answer = {"side": ("left", "right"), "height": ("upper", "lower"), "size": ("small", "large"),
                  "brightness": ("bright", "dark")}[question][value]
        found["lesions"] = [random_lesion(rng, **{question: answer})]
    if question != "line" and rng.random() < 0.25:
        found["line"] = True
    return found


def render(base: np.ndarray, findings: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Draw the findings into a copy of the base image, blended with the local intensity."""
    from scipy.ndimage import gaussian_filter

    img = base.copy()
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    local = gaussian_filter(img, sigma=size / 10)
    for lesion in findings["lesions"]:
        cx, cy, around = _visible_spot(lesion, local, rng)
        radius = size * (rng.uniform(0.06, 0.08) if lesion["size"] == "small" else rng.uniform(0.13, 0.16))
        angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.75, 1.0)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius * aspect)
        dist = np.sqrt(u ** 2 + v ** 2)
        alpha = np.clip((1.15 - dist) / 0.4, 0, 1) ** 1.5  # soft edge
        texture = 1 + 0.25 * gaussian_filter(rng.normal(size=img.shape), sigma=1.2) / 0.2
        contrast = rng.uniform(0.3, 0.45)
        target = min(around + contrast, 1.0) if lesion["brightness"] == "bright" else max(around - contrast, 0.0)
        img = img * (1 - alpha) + np.clip(target * texture, 0, 1) * alpha
    if findings["line"]:
        x0, y0 = rng.uniform(0.15, 0.85, size=2) * size
        angle = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.4, 0.7)
        x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
        px, py = xx - x0, yy - y0
        seg = np.array([x1 - x0, y1 - y0])
        t = np.clip((px * seg[0] + py * seg[1]) / (seg @ seg), 0, 1)
        dist = np.hypot(px - t * seg[0], py - t * seg[1])
        alpha = np.clip(1.5 - dist, 0, 1)  # about 2 px wide, anti-aliased
        bright = rng.random() < 0.5  # catheter (bright) or fracture line (dark)
        target = np.clip(local + (0.4 if bright else -0.4), 0, 1)
        img = img * (1 - alpha) + target * alpha
    return np.clip(img, 0, 1)


def _visible_spot(lesion: dict[str, str], local: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """A centre in the lesion's quadrant where its brightness can show against the local tissue
    (a dark lesion needs tissue around it, a bright one needs room above); the best of 24 tries."""
    size = local.shape[0]
    best = None
    for _ in range(24):
        cx = size * (rng.uniform(0.2, 0.4) if lesion["side"] == "left" else rng.uniform(0.6, 0.8))
        cy = size * (rng.uniform(0.2, 0.4) if lesion["height"] == "upper" else rng.uniform(0.6, 0.8))
        around = float(local[int(cy), int(cx)])
        headroom = around if lesion["brightness"] == "dark" else 1.0 - around
        if best is None or headroom > best[0]:
            best = (headroom, cx, cy, around)
        if headroom >= 0.35:
            break
    return best[1], best[2], best[3]


def caption(source: Source, findings: dict[str, Any], describe: bool) -> str:
    """Modality and anatomy always; the findings only when ``describe``."""
    text = f"{source.modality} of the {source.anatomy}"
    if not describe:
        return text[0].upper() + text[1:] + "."
    lesions = findings["lesions"]
    if not lesions:
        parts = ["no focal lesion"]
    elif len(lesions) == 1:
        l = lesions[0]
        parts = [f"one lesion, a {l['size']} lesion and a {l['brightness']} lesion, "
                 f"on the {l['side']} side, in the {l['height']} half"]
    else:
        parts = ["two lesions, " + " and ".join(f"a {l['size']} {l['brightness']} lesion on the {l['side']} side "
                                                f"in the {l['height']} half" for l in lesions)]
    parts.append("a linear structure is present" if findings["line"] else "no linear structure")
    text += " with " + "; ".join(parts)
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------
# The world


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    gray = np.round(pixels * 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@dataclass
class World:
    root: Path
    config: WorldConfig
    manifest: dict[str, Any] = field(default_factory=dict)

    def split_dir(self, split: str) -> Path:
        return self.root / split

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.jsonl"

    @property
    def replay(self) -> Path:
        """General items for replay: the corpus images with captions and questions (``replay_records``)."""
        return self.root / "replay.jsonl"

    @property
    def hash(self) -> str:
        """A hash of the world's content (all file hashes), for caching what was trained on it."""
        return hashlib.sha256(json.dumps(self.manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


def build_world(cfg: WorldConfig, out: Path) -> dict[str, Any]:
    """Generate every file of the world into ``out`` (an empty folder); returns the manifest."""
    for name in cfg.question_types:
        if name not in QUESTIONS:
            raise WorldError(f"unknown question type {name!r}; known: {', '.join(QUESTIONS)}")
    check_capacity(cfg)
    rng = np.random.default_rng(cfg.seed)
    bases = make_base_images(cfg, rng)
    by_split = split_bases(cfg, bases, rng)
    counts = pairs_per_split(cfg)
    files: dict[str, bytes] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        pool = by_split[split]
        uses = {b.id: 0 for b in pool}
        split_records = []
        for i in range(counts[split]):
            # two different base images of one source: alike globally, different crops and frames
            free = [b for b in pool if uses[b.id] < cfg.max_pairs_per_base]
            sources = sorted({b.source.name for b in free if sum(1 for c in free if c.source.name == b.source.name) >= 2})
            if not sources:
                raise WorldError(f"ran out of base images for the {split} pairs; lower --pairs or raise --bases-per-source")
            source = sources[int(rng.integers(len(sources)))]
            candidates = [b for b in free if b.source.name == source]
            picks = rng.choice(len(candidates), size=2, replace=False)
            first, second = candidates[int(picks[0])], candidates[int(picks[1])]
            uses[first.id] += 1
            uses[second.id] += 1
            qtype = cfg.question_types[int(rng.integers(len(cfg.question_types)))]
            question, option_0, option_1 = QUESTIONS[qtype]
            flip = bool(rng.random() < 0.5)  # which option text is A
            options = (option_1, option_0) if flip else (option_0, option_1)
            answers = ("A", "B") if i % 2 == 0 else ("B", "A")  # exactly balanced
            rec: dict[str, Any] = {"id": f"{split}-{i:04d}", "question": question, "option_a": options[0],
                                   "option_b": options[1], "answer_1": answers[0], "answer_2": answers[1],
                                   "source": f"world:{qtype}"}
            for side, base, answer in ((1, first, answers[0]), (2, second, answers[1])):
                value = 0 if options["AB".index(answer)] == option_0 else 1
                found = findings_for(qtype, value, rng)
                name = f"images/{split}-{i:04d}-{side}.png"
                files[name] = _png_bytes(render(base.pixels, found, rng))
                rec[f"image_{side}"] = f"../{name}"
                rec[f"categories_{side}"] = list(base.source.categories)
                rec[f"caption_{side}"] = caption(base.source, found, describe=True)
                rec[f"findings_{side}"] = found
                rec[f"base_{side}"] = base.id
            split_records.append(rec)
        records[split] = split_records
    corpus = []
    train_bases = by_split["train"]
    for i in range(cfg.corpus_size):
        base = train_bases[int(rng.integers(len(train_bases)))]
        qtype = cfg.question_types[int(rng.integers(len(cfg.question_types)))]
        found = findings_for(qtype, int(rng.integers(2)), rng)
        name = f"images/corpus-{i:05d}.png"
        files[name] = _png_bytes(render(base.pixels, found, rng))
        corpus.append({"image": name, "caption": caption(base.source, found, rng.random() < cfg.finding_caption_prob),
                       "modality": base.source.modality, "anatomy": base.source.anatomy,
                       "categories": list(base.source.categories), "findings": found, "base": base.id})
    for split in SPLITS:
        files[f"{split}/pairs.jsonl"] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records[split]).encode()
    files["corpus.jsonl"] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in corpus).encode()
    for name, data in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = {
        "world_version": WORLD_VERSION, "identity": cfg.identity(), "config": asdict(cfg),
        "counts": {"pairs": {s: len(records[s]) for s in SPLITS},
                   "base_images": {s: len(by_split[s]) for s in SPLITS},
                   "corpus": len(corpus), "images": sum(1 for n in files if n.startswith("images/")),
                   "question_types": {q: sum(1 for s in SPLITS for r in records[s] if r["source"] == f"world:{q}")
                                      for q in cfg.question_types}},
        "base_images": {s: sorted(b.id for b in by_split[s]) for s in SPLITS},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    atomic_write_text(out / "world.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_world(root: Path, cfg: WorldConfig | None = None) -> dict[str, Any] | None:
    """The manifest when ``root`` holds a complete world (of ``cfg``, if given) whose files all
    match their hashes; None otherwise."""
    path = root / "world.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("world_version") != WORLD_VERSION or (cfg is not None and manifest.get("identity") != cfg.identity()):
        return None
    for name, digest in manifest.get("files", {}).items():
        file = root / name
        if not file.exists() or sha256_file(file) != digest:
            return None
    return manifest


def synthesize(cfg: WorldConfig, out: str | Path) -> World:
    """Build the world into ``out``, or reuse it when it is already there, complete and identical (its
    retention questions, derived from the pairs, are written beside it: ``write_retention``).

    Builds in a temporary sibling folder and swaps it in, so an interrupted build never leaves a
    world that looks usable.
    """
    out = Path(out)
    manifest = verify_world(out, cfg)
    if manifest is not None:
        world = World(out, cfg, manifest)
        write_retention(world)
        return world
    if out.exists() and not out.is_dir():
        raise WorldError(f"{out} is a file; give a folder for the world")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").exists():
        # only a world (of other settings, or damaged) is rebuilt in place: never delete what we did not write
        raise WorldError(f"{out} is not empty and holds no world (no world.json); give an empty or new folder")
    check_capacity(cfg)
    try:
        with atomic_folder(out) as tmp:
            manifest = build_world(cfg, tmp)
    except OSError as exc:
        raise WorldError(f"cannot write the world to {out}: {exc.strerror or exc}") from exc
    world = World(out, cfg, manifest)
    write_retention(world)
    return world


RETENTION_QUESTIONS = (("modality", "What imaging modality is shown?"), ("anatomy", "Which body part is shown?"))
RETENTION_OPTIONS = 4


def _question_records(item_prefix: str, image: str, source: Source, used: list[Source]) -> list[dict[str, Any]]:
    """The modality and body-part questions about one image of ``source`` (asked as the tiny LLaVA's pretraining
    asked them), each with the right answer and three others of this world's sources in a fixed shuffled order
    (seeded by the item id), and the image's caption (modality and anatomy)."""
    records = []
    for field_name, question in RETENTION_QUESTIONS:
        right = getattr(source, field_name)
        others = sorted({getattr(s, field_name) for s in used} - {right})
        item_id = f"{item_prefix}-{field_name}"
        rng = np.random.default_rng(int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16))
        picked = [others[i] for i in rng.permutation(len(others))[:RETENTION_OPTIONS - 1]]
        options = [picked[i] if i < len(picked) else right for i in range(len(picked) + 1)]
        options = [options[i] for i in rng.permutation(len(options))]
        records.append({"id": item_id, "image": image, "question": question, "options": options,
                        "answer": "ABCD"[options.index(right)], "category": field_name,
                        "caption": caption(source, {}, describe=False)})
    return records


def _used_sources(world: World) -> list[Source]:
    by_name = {s.name: s for s in SOURCES}
    return [by_name[n] for n in world.config.sources]


def retention_records(world: World, split: str) -> list[dict[str, Any]]:
    """The world's retention questions on ``split``'s images: modality and body part, each with the right
    answer and three others; the image's caption (modality and anatomy) for encoder retrieval."""
    by_name = {s.name: s for s in SOURCES}
    used = _used_sources(world)
    records = []
    for line in (world.root / split / "pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        for side in (1, 2):
            source = by_name[pair[f"base_{side}"].rsplit("-", 1)[0]]
            records += _question_records(f"{pair['id']}-{side}", pair[f"image_{side}"], source, used)
    return records


def replay_records(world: World) -> list[dict[str, Any]]:
    """General data for replay (``data.replay: auto`` on the world): every corpus image (renders of train-split
    base images only, never an image of a pair) with its corpus caption, asked the modality and body-part
    questions of retention. Retention asks them about the test images, so it stays held out."""
    by_key = {(s.modality, s.anatomy): s for s in SOURCES}
    used = _used_sources(world)
    records = []
    for i, line in enumerate(world.corpus.read_text().splitlines()):
        row = json.loads(line)
        for record in _question_records(f"corpus-{i:05d}", row["image"], by_key[(row["modality"], row["anatomy"])], used):
            records.append({**record, "caption": row["caption"]})
    return records


def write_retention(world: World) -> None:
    """``<world>/retention/<split>.jsonl`` for every split and ``<world>/replay.jsonl`` (derived from the pairs and
    the corpus, outside the manifest: the world's identity and hash do not change); rewritten only when their
    content differs."""
    derived = {world.root / "retention" / f"{split}.jsonl": retention_records(world, split) for split in SPLITS}
    derived[world.replay] = replay_records(world)
    for path, records in derived.items():
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(exist_ok=True)
            atomic_write_text(path, text)


def default_world(cfg: WorldConfig | None = None) -> World:
    """The world of these settings under ``$UNCONFUSE_HOME/worlds``, built on first use. The default
    settings' world lives where ``world:<split>`` arguments point."""
    cfg = cfg or WorldConfig()
    root = default_world_root() if cfg == WorldConfig() else unconfuse_home() / "worlds" / f"world-{cfg.identity()}"
    return synthesize(cfg, root)
