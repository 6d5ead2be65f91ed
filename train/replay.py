"""Replay: general data in every training batch, so that a recipe fixes confusing pairs without forgetting.

``data.replay`` names the general data and ``data.replay_fraction`` its share of each batch. What a replay
item is follows the recipe: image-caption records for ``clip_hardneg`` (contrastive loss on them, no pair
term); single-image questions for the MLLM recipes (an SFT row answered with the right option's text, a DPO
row preferring it over another option, a GRPO prompt rewarded for the right letter; LLaVA conversations for
SFT). Replay items come after the pair items of a batch, and a batch never splits a pair.

Formats of ``data.replay``:
- ``none``; ``auto``: the embedded world's general items when the training images are the world's (its corpus
  images, renders of train-split base images only, with their captions and the modality and body-part
  questions retention asks about the test images; ``<world>/replay.jsonl``); anything else is an error;
- a JSONL file: per line an ``image`` (relative to the file's folder) with a ``caption`` (or ``text``; the
  corpus files of ``unconfuse mine``), and/or a ``question`` with ``options`` and the ``answer`` letter
  (retention's format; ``id`` optional), or a LLaVA conversation (``conversations``);
- a JSON file: LLaVA's instruction data, ``[{"image", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}, ...]}]``, images relative to the file's folder;
- a folder: ``metadata.jsonl`` of captioned images (Hugging Face imagefolder, ROCO-style), ``retention.jsonl``,
  or a ``save_to_disk`` dataset; ``hf:<id>[:<split>]``: a ROCO-style captioned set (``image``, ``caption``) or a
  closed-ended VQA set (VQA-RAD / SLAKE train splits: yes/no questions), as ``data.retention`` reads them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unconfuse.eval.io import json_lines
from unconfuse.eval.pairs import Benchmark, BenchmarkError, _read_text
from unconfuse.eval.retention import RetentionItem, RetentionSet, load_retention, make_item
from unconfuse.train.config import ConfigError

REPLAY_HELP = ("general data mixed into every batch, so that the model keeps what it knew: none, auto (the embedded "
               "world's corpus images with captions and modality/body-part questions, for world data), a JSONL or "
               "LLaVA JSON file, a captioned-image folder, or hf:<id>[:<split>] (see unconfuse.train.replay)")
FRACTION_HELP = "share of each training batch that is replay items (0 to 0.9; used with data.replay); the pairs fill the rest"
MAX_FRACTION = 0.9


@dataclass
class ReplayItem(RetentionItem):
    """A replay item: retention's fields (an image with a caption and/or a multiple-choice question), or a LLaVA
    conversation (``turns``: (user, assistant) texts, the image placed before the first user text)."""

    turns: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def check_fraction(replay: str, fraction: float) -> None:
    """``data.replay_fraction`` must be in [0, 0.9], and above 0 when a replay set is named (without one it is unused)."""
    if not 0 <= fraction <= MAX_FRACTION:
        raise ConfigError(f"data.replay_fraction: must be between 0 and {MAX_FRACTION}, got {fraction!r}")
    if replay != "none" and fraction == 0:
        raise ConfigError(f"data.replay: {replay!r} with data.replay_fraction 0 would never be used; set a fraction "
                          "above 0, or replay: none")


def replay_per_batch(fraction: float, pair_items: int) -> int:
    """How many replay items join ``pair_items`` pair items so that they are ``fraction`` of the batch (at least
    one when the fraction is above 0)."""
    if fraction <= 0:
        return 0
    return max(1, round(fraction / (1 - fraction) * pair_items))


def world_root_of(bench: Benchmark) -> Path | None:
    """The embedded world folder every image of ``bench`` lives in (a world split, or a cv fold of one), or None."""
    roots: dict[Path, Path | None] = {}  # image folder -> its world (images share a few folders)
    for ref in bench.unique_images():
        folder = bench.resolve_image(ref).resolve().parent
        if folder not in roots:
            roots[folder] = next((p for p in (folder, *folder.parents) if (p / "world.json").is_file()), None)
    found = set(roots.values())
    return found.pop() if len(found) == 1 and None not in found else None


def resolve_replay(arg: str, train: Benchmark) -> str | None:
    """A ``data.replay`` value as a loadable argument: ``none`` -> None; ``auto`` -> the world's replay items when
    the training images are the embedded world's, else a ConfigError (no silent default for real data)."""
    if arg == "none":
        return None
    if arg != "auto":
        return arg
    root = world_root_of(train)
    if root is None or not (root / "replay.jsonl").is_file():
        raise ConfigError(f"data.replay: auto finds general data for the embedded world only, and {train.name!r} is not "
                          "the world's; give a file, folder or hf:<id> of general data (captions for encoders, "
                          "questions or LLaVA conversations for MLLMs), or none")
    return str(root / "replay.jsonl")


def load_replay(arg: str) -> RetentionSet:
    """The replay items of ``arg`` (see the module docstring); errors are one line naming the file and the row."""
    path = Path(arg).expanduser()
    if arg.startswith("hf:") or path.is_dir():
        return load_retention(arg)
    if not path.is_file():
        raise BenchmarkError(f"data.replay: {arg!r} not found: give a .jsonl or LLaVA .json file, a folder or hf:<id>")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise BenchmarkError(f"{path}: LLaVA instruction data is a JSON list of conversations")
        items = [_conversation(row, f"{path}: item {i}", str(i)) for i, row in enumerate(rows)]
    elif path.suffix.lower() == ".jsonl":
        items = [_jsonl_item(raw, where, str(number)) for number, where, raw in json_lines(_read_text(path).split("\n"), path, BenchmarkError)]
    else:
        raise BenchmarkError(f"{path}: a replay file is JSONL (.jsonl) or LLaVA JSON (.json)")
    if not items:
        raise BenchmarkError(f"{path}: no replay items")
    return RetentionSet(items, path.parent, path.name)


def _jsonl_item(raw: Any, where: str, number: str) -> ReplayItem:
    if isinstance(raw, dict) and "conversations" in raw:
        return _conversation(raw, where, number)
    if isinstance(raw, dict):
        raw = {"id": number, **raw}
        if raw.get("caption") is None and isinstance(raw.get("text"), str):
            raw["caption"] = raw["text"]
    item = make_item(raw, where)
    return ReplayItem(**dataclasses.asdict(item))


def _conversation(raw: Any, where: str, number: str) -> ReplayItem:
    """One LLaVA conversation: alternating human / gpt turns about one image."""
    if not isinstance(raw, dict) or not isinstance(raw.get("image"), str) or not raw["image"]:
        raise BenchmarkError(f"{where}: a LLaVA conversation needs an 'image' (a conversation without one is not replay "
                             "for an image model)")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        raise BenchmarkError(f"{where}: 'conversations' must alternate human and gpt turns")
    pairs = []
    for k in range(0, len(turns), 2):
        human, gpt = turns[k], turns[k + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human" and gpt.get("from") == "gpt"
                and isinstance(human.get("value"), str) and isinstance(gpt.get("value"), str)):
            raise BenchmarkError(f"{where}: turn {k}: expected a human turn then a gpt turn, each with a 'value'")
        pairs.append((human["value"].replace("<image>", "").strip(), gpt["value"].strip()))
    return ReplayItem(str(raw.get("id", number)), raw["image"], turns=pairs)


def caption_items(rset: RetentionSet, arg: str, texts: str = "caption", template: str = "{option}") -> list[tuple[Path, str]]:
    """(image path, text) records an encoder replays: ``caption``: every captioned image with its caption;
    ``answer``: every question's image with its right option in the scoring prompt ``template`` (the text that
    zero-shot classification compares); ``both``: the two."""
    records: list[tuple[Path, str]] = []
    if texts in ("caption", "both"):
        records += [(rset.resolve_image(ref), text) for ref, text in rset.captioned_images().items()]
    if texts in ("answer", "both"):
        records += [(rset.resolve_image(item.image), template.format(option=item.correct_option, question=item.question))
                    for item in rset.questions]
    if not records:
        kinds = {"caption": "captioned images", "answer": "questions with options"}.get(texts, "captions or questions")
        raise ConfigError(f"data.replay: {arg!r} has no {kinds} (data.replay_text: {texts}); an encoder replays those")
    return records


def question_items(rset: RetentionSet, arg: str, conversations: bool = False) -> list[ReplayItem | RetentionItem]:
    """The items an MLLM recipe replays: multiple-choice questions, and LLaVA conversations when ``conversations``
    (SFT only: preference and reward need options to compare)."""
    items = [item for item in rset.items if item.question is not None or (conversations and getattr(item, "turns", None))]
    if not items:
        kinds = "questions with options or LLaVA conversations" if conversations else "questions with options"
        raise ConfigError(f"data.replay: {arg!r} has no {kinds}; this recipe replays those")
    return items


def wrong_option(item: RetentionItem, seed: int) -> str:
    """One wrong option of ``item``, fixed per item and seed (the rejected reply of a replay preference row)."""
    import hashlib

    wrong = [o for o in item.options if o != item.correct_option]
    digest = int(hashlib.sha256(f"{seed}:{item.id}".encode()).hexdigest()[:8], 16)
    return wrong[digest % len(wrong)]


def with_replay(strategy: str, cfg) -> str:
    """A recipe's default strategy name, marked ``+replay`` when the run replays general data (so that compare
    and W&B never group a replaying run with one that does not)."""
    return f"{strategy}+replay" if cfg.data.replay != "none" else strategy


def describe_replay(name: str, items: int, per_batch: int, pair_items: int) -> str:
    """The line a run prints about its replay."""
    share = per_batch / (per_batch + pair_items)
    return (f"replay: {items} items of {name}, {per_batch} per batch beside {pair_items} pair items "
            f"({100 * share:.0f}% of each batch)")


__all__ = ["ReplayItem", "check_fraction", "replay_per_batch", "resolve_replay", "load_replay", "caption_items",
           "question_items", "wrong_option", "with_replay", "describe_replay", "world_root_of", "REPLAY_HELP", "FRACTION_HELP"]
