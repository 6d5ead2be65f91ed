"""Retention: what a mitigation costs a model's general ability, measured beside its gain on the pairs.

A retention set is held-out single-image questions (any number of options) and, optionally, a caption
per image. MLLMs answer the questions (greedy: the option's letter as the next token; prefix: each
option scored as the reply, as the pretraining asked it); encoders classify each image zero-shot
among the options and retrieve its caption among all the set's captions (R@1). Before and after
are compared on the same items: a paired bootstrap interval of the difference and the exact
McNemar test.

Formats (``data.retention`` in the recipes):
- ``world:<split>``: the embedded world's modality and body-part questions on that split's images
  (written beside the world by ``unconfuse.eval.world``; the base models were pretrained on them);
- a JSONL file (or a folder holding ``retention.jsonl``): ``{"id", "image", "question", "options": [...],
  "answer": "<letter>", "category"?, "caption"?}`` per line, images relative to the file's folder;
- ``hf:<id>[:<split>]`` or a ``save_to_disk`` folder of a closed-ended medical VQA set in the VQA-RAD /
  SLAKE layout (``image``, ``question``, ``answer``; SLAKE's ``answer_type``/``q_lang`` respected): the
  yes/no questions become two-option items (options "yes", "no");
- a folder of captioned images with ``metadata.jsonl`` (Hugging Face imagefolder: ``file_name`` and
  ``caption`` or ``text``), ROCO-style: captions only (retrieval for encoders).

This module imports neither torch nor transformers at import time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .home import default_world_root
from .io import json_lines
from .pairs import BenchmarkError, _read_text
from .prompts import load_prompts
from .stats import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, mcnemar_exact, mean_interval, percentile_interval, resamples

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MLLM_MODES = ("greedy", "prefix")
RETENTION_PROMPTS = "retention-v1"  # greedy retention's prompt: the pair questions' greedy prompt, any number of options


@dataclass
class RetentionItem:
    """One held-out question about one image (``answer`` is the correct option's letter), or a captioned
    image without a question (``question`` None)."""

    id: str
    image: str
    question: str | None = None
    options: list[str] = dataclasses.field(default_factory=list)
    answer: str | None = None
    category: str | None = None
    caption: str | None = None

    @property
    def correct_option(self) -> str | None:
        return self.options[LETTERS.index(self.answer)] if self.answer else None


@dataclass
class RetentionSet:
    items: list[RetentionItem]
    image_root: Path
    name: str

    def resolve_image(self, ref: str) -> Path:
        path = Path(ref)
        return path if path.is_absolute() else self.image_root / ref

    @property
    def questions(self) -> list[RetentionItem]:
        return [item for item in self.items if item.question is not None]

    def captioned_images(self) -> dict[str, str]:
        """image reference -> caption, one per image (the first item's caption)."""
        out: dict[str, str] = {}
        for item in self.items:
            if item.caption and item.image not in out:
                out[item.image] = item.caption
        return out

    def fingerprint(self) -> str:
        """Every item and the bytes of every image (as ``Benchmark.fingerprint``)."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(json.dumps(dataclasses.asdict(item), sort_keys=True).encode())
        for ref in dict.fromkeys(item.image for item in self.items):
            path = self.resolve_image(ref)
            digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing")
        return digest.hexdigest()[:16]


def make_item(raw: Any, where: str) -> RetentionItem:
    """A retention item from one JSON record; errors name ``where`` (file and line) and the key."""
    if not isinstance(raw, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("id", "image"):
        if not isinstance(raw.get(key), (str, int)) or raw.get(key) == "":
            raise BenchmarkError(f"{where}: missing or empty {key!r}")
    question, options, answer = raw.get("question"), raw.get("options", []), raw.get("answer")
    if question is None and not raw.get("caption"):
        raise BenchmarkError(f"{where}: neither a 'question' nor a 'caption'")
    if question is not None:
        if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) and o for o in options):
            raise BenchmarkError(f"{where}: 'options' must be a list of 2 to {len(LETTERS)} non-empty strings")
        if len(set(options)) != len(options):
            raise BenchmarkError(f"{where}: 'options' repeat a text")
        if not isinstance(answer, str) or answer not in LETTERS[:len(options)]:
            raise BenchmarkError(f"{where}: 'answer' must be one of the option letters {', '.join(LETTERS[:len(options)])}")
    return RetentionItem(str(raw["id"]), str(raw["image"]), question, list(options) if question is not None else [],
                         answer if question is not None else None, raw.get("category"), raw.get("caption"))


def _checked(items: list[RetentionItem], where: str) -> list[RetentionItem]:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise BenchmarkError(f"{where}: item id {item.id!r} appears twice")
        seen.add(item.id)
    if not items:
        raise BenchmarkError(f"{where}: no retention items")
    return items


def load_retention_jsonl(path: Path) -> list[RetentionItem]:
    return _checked([make_item(raw, where) for _, where, raw in json_lines(_read_text(path).split("\n"), path, BenchmarkError)],
                    str(path))


def load_retention(arg: str | Path) -> RetentionSet:
    """Resolve a retention argument (see the module docstring); errors are one line naming the file or row."""
    text = str(arg)
    if text.startswith("world:"):
        world = default_world_root()
        path = world / "retention" / f"{text.split(':', 1)[1]}.jsonl"
        if not path.exists():
            raise BenchmarkError(f"{text}: no retention questions at {path}; the world writes them when it is prepared "
                                 "(unconfuse commands and recipes prepare it on first use)")
        return RetentionSet(load_retention_jsonl(path), path.parent, text)
    if text.startswith("hf:"):
        name, _, split = text[3:].partition(":")
        return _load_closed_vqa(name, split or None, text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "retention.jsonl").exists():
            return RetentionSet(load_retention_jsonl(path / "retention.jsonl"), path, path.name)
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _load_closed_vqa(str(path), None, path.name)
        if (path / "metadata.jsonl").exists():
            return _load_captioned_folder(path)
        raise BenchmarkError(f"{path}: no retention.jsonl, metadata.jsonl (captioned images) or saved HF dataset in this folder")
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise BenchmarkError(f"{path}: a retention file is JSONL (.jsonl)")
        return RetentionSet(load_retention_jsonl(path), path.parent, f"{path.parent.name}/{path.name}")
    raise BenchmarkError(f"retention set {text!r} not found: give world:<split>, a .jsonl file, a folder or hf:<id>[:<split>]")


def _load_captioned_folder(folder: Path) -> RetentionSet:
    items = []
    metadata = folder / "metadata.jsonl"
    for _, where, raw in json_lines(_read_text(metadata).split("\n"), metadata, BenchmarkError):
        if not isinstance(raw, dict) or not raw.get("file_name"):
            raise BenchmarkError(f"{where}: missing 'file_name'")
        caption = raw.get("caption") or raw.get("text")
        if not caption:
            raise BenchmarkError(f"{where}: missing 'caption' (or 'text')")
        items.append(RetentionItem(str(raw.get("id", raw["file_name"])), str(raw["file_name"]), caption=str(caption)))
    return RetentionSet(_checked(items, str(folder)), folder, folder.name)


def _load_closed_vqa(name_or_dir: str, split: str | None, label: str) -> RetentionSet:
    """The yes/no questions of a VQA-RAD / SLAKE style Hugging Face dataset as two-option items; or, for a
    ROCO-style dataset (``image``, ``caption``), its captioned images."""
    import datasets

    from .home import unconfuse_home
    from .pairs import _export_image

    local = Path(name_or_dir)
    ds = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(name_or_dir)
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("test" if "test" in ds else next(iter(ds)))
        ds = ds[split]
    cache = unconfuse_home() / "hf_images" / hashlib.sha1(name_or_dir.encode()).hexdigest()[:12]
    if "caption" in ds.column_names and "question" not in ds.column_names:  # ROCO-style captioned images
        items = [RetentionItem(str(row.get("id", i)), str(_export_image(row["image"], cache)) if not isinstance(row["image"], str)
                               else row["image"], caption=str(row["caption"])) for i, row in enumerate(ds)]
        return RetentionSet(_checked(items, label), local if local.is_dir() else cache, label)
    missing = [c for c in ("image", "question", "answer") if c not in ds.column_names]
    if missing:
        raise BenchmarkError(f"{label}: a closed-ended VQA set needs columns image, question, answer (or image, caption); "
                             f"missing {', '.join(missing)}")
    items = []
    for i, row in enumerate(ds):
        if row.get("q_lang", "en") != "en" or str(row.get("answer_type", "CLOSED")).upper() != "CLOSED":
            continue
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            continue
        image = row["image"]
        ref = str(_export_image(image, cache)) if not isinstance(image, str) else image
        items.append(RetentionItem(str(row.get("qid", row.get("id", i))), ref, str(row["question"]), ["yes", "no"],
                                   "A" if answer == "yes" else "B", row.get("content_type") or row.get("modality")))
    return RetentionSet(_checked(items, label), local if local.is_dir() else cache, label)


# ---------------------------------------------------------------------------------------------
# Scoring


def _queries(rset: RetentionSet, items: list[RetentionItem], render) -> list:
    """Each item's image as a query with the prompt ``render(item)`` (keyed as eval's queries key the same image)."""
    from .models.base import build_queries

    return build_queries((rset.resolve_image(item.image), render(item), item.options, {"id": item.id}) for item in items)


def answer_mllm(backend, rset: RetentionSet, mode: str, items: list[RetentionItem] | None = None,
                batch: int = 16) -> list[dict[str, Any]]:
    """One record per question: ``{"id", "answer", "correct", "scores"}`` (``answer`` None when a score is NaN or
    none is finite: no answer, never a letter). Queries are grouped by option count (one batched call each)."""
    from .scorer import choose_letter

    if mode not in MLLM_MODES:
        raise ValueError(f"retention mode {mode!r}: one of {', '.join(MLLM_MODES)}")
    items = rset.questions if items is None else items
    by_count: dict[int, list[RetentionItem]] = {}
    for item in items:
        by_count.setdefault(len(item.options), []).append(item)
    records: dict[str, dict[str, Any]] = {}
    template = load_prompts(RETENTION_PROMPTS).template("greedy") if mode == "greedy" else None
    for count, group in by_count.items():
        letters = tuple(LETTERS[:count])
        for start in range(0, len(group), batch):
            chunk = group[start:start + batch]
            if mode == "greedy":
                queries = _queries(rset, chunk, lambda it: template.format(
                    question=it.question, options="\n".join(f"{l}: {o}" for l, o in zip(letters, it.options))))
                scores = backend.next_token_scores(queries, letters)
            else:
                queries = _queries(rset, chunk, lambda it: it.question)
                scores = backend.continuation_scores(queries, [tuple(it.options) for it in chunk])
            for item, row in zip(chunk, scores):
                choice = choose_letter(row)
                answer = None if choice is None else letters[choice]
                records[item.id] = {"id": item.id, "answer": answer, "correct": answer == item.answer,
                                    "scores": dict(zip(letters, row))}
    return [records[item.id] for item in items]


def answer_encoder(backend, rset: RetentionSet, template: str = "{option}") -> list[dict[str, Any]]:
    """Zero-shot classification of every question's image among its options (``template`` makes each option's
    text) and image-to-caption retrieval among the set's distinct captions: ``{"id", "answer", "correct"}`` per
    question, ``{"image", "retrieved", "hit"}`` per captioned image (a hit: the top caption is the image's own text)."""
    records = []
    questions = rset.questions
    if questions:
        queries = _queries(rset, questions, lambda it: it.question)
        texts = [tuple(template.format(option=o, question=it.question) for o in it.options) for it in questions]
        for item, row in zip(questions, backend.similarities(queries, texts)):
            answer = LETTERS[int(np.argmax(row))]
            records.append({"id": item.id, "answer": answer, "correct": answer == item.answer})
    captioned = rset.captioned_images()
    if captioned:
        captions = tuple(dict.fromkeys(captioned.values()))
        refs = list(captioned)
        items = [RetentionItem(ref, ref) for ref in refs]
        queries = _queries(rset, items, lambda it: "")
        for ref, row in zip(refs, backend.similarities(queries, [captions] * len(queries))):
            retrieved = captions[int(np.argmax(row))]
            records.append({"image": ref, "retrieved": retrieved, "hit": retrieved == captioned[ref]})
    return records


def metrics_of(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-item booleans of each retention metric present in ``records``."""
    out = {}
    answered = [r for r in records if "correct" in r]
    if answered:
        out["accuracy"] = np.array([r["correct"] for r in answered], dtype=bool)
    retrieved = [r for r in records if "hit" in r]
    if retrieved:
        out["retrieval_r1"] = np.array([r["hit"] for r in retrieved], dtype=bool)
    return out


def answer_retention(backend, spec, rset: RetentionSet, mode: str, prompts, batch: int = 16) -> list[dict[str, Any]]:
    """Retention records of ``backend`` in ``mode``: ``clip`` (an encoder: zero-shot with the preset's clip prompt of
    ``prompts``, and caption retrieval), else ``greedy`` or ``prefix`` (an MLLM's answers)."""
    if mode == "clip":
        return answer_encoder(backend, rset, prompts.template("clip", spec.clip_prompt))
    return answer_mllm(backend, rset, mode, batch=batch)


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """``retention/<stage>.jsonl``, atomically (``read_records`` reads it)."""
    from .io import atomic_write_text

    path.parent.mkdir(exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_records(path: Path) -> list[dict[str, Any]]:
    """A run's retention records (``retention/<stage>.jsonl``); a torn or foreign line is refused naming it."""
    from .runs import RunFormatError

    return [value for _, _, value in json_lines(path.read_text().splitlines(), path, RunFormatError)]


def summarize(records: list[dict[str, Any]], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Each metric's value (percent), its bootstrap 95% interval and its item count."""
    return {name: {"value": 100.0 * float(v.mean()), "ci": mean_interval(v, samples, seed), "n": int(len(v))}
            for name, v in metrics_of(records).items()}


def retention_block(rset: RetentionSet, mode: str, before: list[dict[str, Any]], after: list[dict[str, Any]],
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """``results.json``'s ``retention``: per metric, before and after with intervals, the paired difference
    (after - before) with its bootstrap interval, and the exact McNemar test on the same items. The headline
    metric (``headline``) is question accuracy when the set has questions, else caption retrieval R@1."""
    return pooled_retention_block(rset.name, rset.fingerprint(), mode, [before], [after], samples, seed)


def pooled_retention_block(name: str, fingerprint: str, mode: str, befores: list[list[dict[str, Any]]],
                           afters: list[list[dict[str, Any]]], samples: int = BOOTSTRAP_SAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """The retention block of one run (one ``before``/``after``) or of several runs scored on the same items
    (a cv's folds: each fold's model against its base). Per item, the change is its mean over the runs; the
    interval bootstraps items (an item is one unit however many runs scored it), and ``mcnemar_p`` is the
    exact sign test on the items whose mean change is not zero, which for one run is McNemar's exact test."""
    if len(befores) != len(afters) or not befores:
        raise ValueError("retention: one before and one after per run")
    per_run = [(metrics_of(b), metrics_of(a)) for b, a in zip(befores, afters)]
    sizes = {k: len(v) for k, v in per_run[0][0].items()}  # metric -> items, in the order records give them
    if any({k: len(v) for k, v in scored.items()} != sizes for run in per_run for scored in run):
        raise ValueError("retention before and after were scored on different items")
    metrics = {}
    for metric in sizes:
        before = np.mean([b[metric] for b, _ in per_run], axis=0)  # per item, over runs
        after = np.mean([a[metric] for _, a in per_run], axis=0)
        change = after - before
        diff_samples = 100.0 * change[resamples(len(change), samples, seed)].mean(axis=1)
        gained, lost = int((change > 0).sum()), int((change < 0).sum())
        metrics[metric] = {"before": 100.0 * float(before.mean()), "before_ci": mean_interval(before, samples, seed),
                           "after": 100.0 * float(after.mean()), "after_ci": mean_interval(after, samples, seed),
                           "diff": float(100.0 * after.sum() / len(change) - 100.0 * before.sum() / len(change)),
                           "diff_ci": percentile_interval(diff_samples), "mcnemar_p": mcnemar_exact(lost, gained),
                           "n": int(len(change))}
        if len(per_run) > 1:
            metrics[metric]["after_per_run"] = [100.0 * float(a[metric].mean()) for _, a in per_run]
    block = {"benchmark": name, "fingerprint": fingerprint, "mode": mode,
             "headline": "accuracy" if "accuracy" in metrics else "retrieval_r1", "metrics": metrics}
    if len(per_run) > 1:
        block["runs"] = len(per_run)
    return block
