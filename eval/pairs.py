"""Confusing pairs: the data model and the loaders for every benchmark format we accept.

A pair is one record with two images that share a question and two options but need different
answers. Formats: the upstream MediConfusion ``dataset.json`` and ``dataset.csv``, JSONL in our
pair schema (what mining and the embedded world write), and Hugging Face datasets (hub id or a
local ``save_to_disk`` folder). Every loader validates rows and names the offending one.

This module imports neither torch nor transformers (the scorer depends on it).
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ANSWERS = ("A", "B")

# The nine categories of MediConfusion, in the reference table's order.
MEDICONFUSION_CATEGORIES = (
    "Cerebral", "Vascular", "Head and Neck", "Spinal", "Musculoskeletal",
    "Cardiac", "Gastrointestinal", "Pulmonary", "Nuclear Medicine",
)


class BenchmarkError(ValueError):
    """A benchmark file or row is malformed; the message names the file and the row."""


@dataclass
class Pair:
    """One confusing pair in our schema (a superset-compatible core of the upstream fields)."""

    id: str
    image_1: str
    image_2: str
    question: str
    option_a: str
    option_b: str
    answer_1: str
    answer_2: str
    categories_1: list[str] = field(default_factory=list)
    categories_2: list[str] = field(default_factory=list)
    caption_1: str | None = None
    caption_2: str | None = None
    source: str | None = None
    sims: dict[str, float] | None = None

    def image(self, side: int) -> str:
        return self.image_1 if side == 1 else self.image_2

    def answer(self, side: int) -> str:
        return self.answer_1 if side == 1 else self.answer_2

    def categories(self, side: int) -> list[str]:
        return self.categories_1 if side == 1 else self.categories_2

    @property
    def options(self) -> tuple[str, str]:
        return (self.option_a, self.option_b)

    def to_record(self) -> dict[str, Any]:
        """The JSONL record, without the optional fields that are unset."""
        rec = dataclasses.asdict(self)
        return {k: v for k, v in rec.items() if v is not None}


PAIR_FIELDS = {f.name for f in dataclasses.fields(Pair)}
REQUIRED_FIELDS = ("id", "image_1", "image_2", "question", "option_a", "option_b", "answer_1", "answer_2")

# Upstream (MediConfusion dataset.json / dataset.csv / HF) names -> our names.
UPSTREAM_FIELD_MAP = {
    "question": "question", "option_A": "option_a", "option_B": "option_b",
    "im_1_correct": "answer_1", "im_2_correct": "answer_2",
    "category_1": "categories_1", "category_2": "categories_2",
    "cap_1": "caption_1", "cap_2": "caption_2",
}


def _as_list(value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise BenchmarkError(f"{where}: cannot read category list {value!r}") from exc
        else:
            value = [text]
    if not isinstance(value, (list, tuple)):
        raise BenchmarkError(f"{where}: categories must be a list, got {type(value).__name__}")
    return [str(v) for v in value]


def make_pair(raw: dict[str, Any], where: str) -> Pair:
    """Validate one record in our schema and build a Pair; ``where`` names the row in errors."""
    unknown = set(raw) - PAIR_FIELDS
    data = {k: v for k, v in raw.items() if k in PAIR_FIELDS}
    missing = [k for k in REQUIRED_FIELDS if data.get(k) in (None, "")]
    if missing:
        raise BenchmarkError(f"{where}: missing or empty field(s) {', '.join(missing)}")
    for key in ("id", "image_1", "image_2", "question", "option_a", "option_b"):
        data[key] = str(data[key])
    for key in ("option_a", "option_b", "question"):
        if not data[key].strip():
            raise BenchmarkError(f"{where}: empty {key}")
    if data["option_a"].strip().casefold() == data["option_b"].strip().casefold():
        raise BenchmarkError(f"{where}: pair {data['id']!r}: option_a and option_b are the same ({data['option_a']!r}); "
                             f"no image can pick one over the other")
    for key in ("answer_1", "answer_2"):
        value = str(data[key]).strip()
        if value not in ANSWERS:
            raise BenchmarkError(f"{where}: {key} must be 'A' or 'B', got {data[key]!r}")
        data[key] = value
    for key in ("categories_1", "categories_2"):
        data[key] = _as_list(data.get(key), where)
    del unknown  # extra keys (e.g. AI drafts) are allowed and dropped
    return Pair(**data)


def _from_upstream(pair_id: str, row: dict[str, Any], where: str) -> Pair:
    rec: dict[str, Any] = {"id": str(pair_id)}
    for up, ours in UPSTREAM_FIELD_MAP.items():
        if up in row:
            rec[ours] = row[up]
    for side in (1, 2):
        local = row.get(f"im_{side}_local")
        if local not in (None, ""):
            # upstream images are saved as <local id>.jpg; ints may arrive as floats from CSV
            rec[f"image_{side}"] = f"{int(float(local))}.jpg"
        elif row.get(f"image_{side}") or row.get(f"im_{side}"):
            rec[f"image_{side}"] = str(row.get(f"image_{side}") or row[f"im_{side}"])
    sims = {k: float(row[k]) for k in ("BiomedCLIP_sim", "DINO_sim") if row.get(k) not in (None, "")}
    rec["sims"] = sims or None
    rec["source"] = "mediconfusion"
    return make_pair(rec, where)


def _check_unique(pairs: list[Pair], where: str) -> list[Pair]:
    seen: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        if pair.id in seen:
            raise BenchmarkError(f"{where}: duplicate pair id {pair.id!r} (rows {seen[pair.id] + 1} and {i + 1})")
        seen[pair.id] = i
    if not pairs:
        raise BenchmarkError(f"{where}: no pairs")
    return pairs


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; anything else is an error naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BenchmarkError(f"{path}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x})") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def load_upstream_json(path: str | Path) -> list[Pair]:
    """The upstream ``dataset.json``: {pair id: {im_1, im_1_local, question, option_A, ...}}."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path}: line {exc.lineno}: not JSON ({exc.msg})") from None
    if isinstance(data, list):  # a JSON list of records in our schema
        return _check_unique([make_pair(_object(r, f"{path}: item {i}"), f"{path}: item {i}") for i, r in enumerate(data)],
                             str(path))
    data = _object(data, f"{path}: the top level (pair id -> pair object, or a list of pair objects)")
    pairs = [_from_upstream(k, _object(v, f"{path}: pair {k}"), f"{path}: pair {k}") for k, v in data.items()]
    return _check_unique(pairs, str(path))


def load_upstream_csv(path: str | Path) -> list[Pair]:
    """The upstream ``dataset.csv`` (list fields written as Python list literals)."""
    path = Path(path)
    pairs = []
    with io.StringIO(_read_text(path), newline="") as fh:
        reader = csv.DictReader(fh)
        for lineno, row in enumerate(reader, start=2):
            where = f"{path}: row {lineno}"
            if "option_A" in row:
                if not row.get("id"):
                    raise BenchmarkError(f"{where}: missing id")
                pairs.append(_from_upstream(row["id"], row, where))
            else:
                pairs.append(make_pair(dict(row), where))
    return _check_unique(pairs, str(path))


def load_jsonl(path: str | Path) -> list[Pair]:
    """JSONL of records in our pair schema, one per line."""
    path = Path(path)
    pairs = []
    from .io import json_lines

    for _, where, rec in json_lines(_read_text(path).split("\n"), path, BenchmarkError):
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: expected a JSON object")
        pairs.append(make_pair(rec, where))
    return _check_unique(pairs, str(path))


def write_jsonl(pairs: Iterable[Pair], path: str | Path) -> None:
    """Write pairs as JSONL atomically."""
    from .io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p.to_record(), ensure_ascii=False) + "\n" for p in pairs))


def load_hf_dataset(name_or_dir: str, split: str | None = None, image_cache: str | Path | None = None) -> tuple[list[Pair], Path]:
    """A Hugging Face dataset (hub id or local ``save_to_disk`` / data folder) in either schema.

    Embedded image columns (``datasets.Image``) are written once to ``image_cache`` under their
    content hash, so every other loader's image resolution applies unchanged. Returns the pairs
    and the image root.
    """
    import datasets

    local = Path(name_or_dir)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))
    else:
        ds = datasets.load_dataset(name_or_dir)
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("test" if "test" in ds else next(iter(ds)))
        ds = ds[split]
    from .home import unconfuse_home

    cache = Path(image_cache or unconfuse_home() / "hf_images" / hashlib.sha1(name_or_dir.encode()).hexdigest()[:12])
    root = local if local.is_dir() else cache
    pairs = []
    for i, row in enumerate(ds):
        where = f"{name_or_dir}: row {i}"
        row = dict(row)
        for side in (1, 2):
            for key in (f"image_{side}", f"im_{side}"):
                value = row.get(key)
                if value is not None and not isinstance(value, (str, int, float)):
                    row[key] = str(_export_image(value, cache))
                    row.pop(f"im_{side}_local", None)
        if "option_A" in row:
            pairs.append(_from_upstream(row.get("id", i), row, where))
        else:
            pairs.append(make_pair(row, where))
    return _check_unique(pairs, name_or_dir), root


def _export_image(image: Any, cache: Path) -> Path:
    """Save an embedded PIL image under its content hash (idempotent) and return the path."""
    import io as _io

    buf = _io.BytesIO()
    image.save(buf, format="PNG")
    digest = hashlib.sha256(buf.getvalue()).hexdigest()[:20]
    out = cache / f"{digest}.png"
    if not out.exists():
        from .io import atomic_write_bytes

        atomic_write_bytes(out, buf.getvalue())
    return out.resolve()


@dataclass
class Benchmark:
    """A list of pairs plus the folder that image references resolve against."""

    pairs: list[Pair]
    image_root: Path
    name: str

    def resolve_image(self, ref: str) -> Path:
        """Image path for a reference: absolute, ``root/ref`` or ``root/images/ref``."""
        path = Path(ref)
        if path.is_absolute():
            return path
        candidates = (self.image_root / ref, self.image_root / "images" / ref)
        for candidate in candidates:
            if candidate.exists():
                return candidate
        # missing: name where it was most likely meant to be (upstream ids live under images/)
        bare_name = "/" not in ref and (self.image_root / "images").is_dir()
        return candidates[1] if bare_name else candidates[0]

    def unique_images(self) -> list[str]:
        """Image references in first-seen order, each once."""
        seen: dict[str, None] = {}
        for pair in self.pairs:
            seen.setdefault(pair.image_1)
            seen.setdefault(pair.image_2)
        return list(seen)

    def fingerprint(self) -> str:
        """A hash of what this benchmark holds: every pair record and the bytes of every image, so an
        edited row or a replaced image gives another fingerprint (names and folders do not matter)."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            digest.update(json.dumps(dataclasses.asdict(pair), sort_keys=True, default=str).encode())
        for ref in self.unique_images():
            path = self.resolve_image(ref)
            digest.update(ref.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing")
        return digest.hexdigest()[:16]

    def category_counts(self) -> dict[str, int]:
        """Image-side category label counts: the reference per-category denominators."""
        counts: dict[str, int] = {}
        for pair in self.pairs:
            for cat in pair.categories_1 + pair.categories_2:
                counts[cat] = counts.get(cat, 0) + 1
        return counts

    def limit(self, n: int | None) -> "Benchmark":
        return self if not n else Benchmark(self.pairs[:n], self.image_root, self.name)
