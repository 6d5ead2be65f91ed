"""What a run reads besides its config, checked before any model loads: every image of its pairs, retention and
replay sets decoded once; the retention and replay sets its ``data.*`` settings name, resolved; a real model on
the embedded world's toy images refused."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from unconfuse.eval.benchmarks import BenchmarkError
from unconfuse.eval.images import check_images, image_problem
from unconfuse.eval.leakage import ImageSource
from unconfuse.eval.models import find_preset, resolve_model
from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.retention import RetentionSet, load_retention
from unconfuse.train.config import ConfigError
from unconfuse.train.replay import check_fraction, load_replay, resolve_replay, world_root_of


def check_run_images(sources: dict[str, ImageSource | None]) -> None:
    """Every image a run will read (pairs, retention and replay sets), decoded once before any model loads, as
    eval checks its benchmark: a missing or unreadable one is a BenchmarkError naming the setting, how many,
    and the first few."""
    for setting_name, source in sources.items():
        if source is None:
            continue
        if isinstance(source, Benchmark):
            problems = [str(problem) for problem in check_images(source)]
        else:
            first_item = {}  # each image once (a replay image carries several questions)
            for item in source.items:
                first_item.setdefault(str(source.resolve_image(item.image)), item.id)
            problems = [f"item {item_id}: {path}: {why}" for path, item_id in first_item.items()
                        for why in [image_problem(path)] if why]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise BenchmarkError(f"{setting_name}: {len(problems)} image(s) missing or unreadable: {shown}")


def replay_set(cfg: Any, train: Benchmark) -> RetentionSet | None:
    """The general data replayed in every batch (``data.replay``, ``data.replay_fraction``), or None."""
    check_fraction(cfg.data.replay, cfg.data.replay_fraction)
    arg = resolve_replay(cfg.data.replay, train)
    return load_replay(arg) if arg else None


def resolve_retention(arg: str, bench_arg: str) -> str | None:
    """A ``data.retention`` / ``data.val_retention`` value as a retention argument: ``none`` -> None; ``auto`` ->
    the embedded world's questions on the images of ``bench_arg`` when it is a world split (``world:<split>`` or a
    world's split folder), else None (set it for real data: a JSONL file, a folder or ``hf:<id>``)."""
    if arg == "none":
        return None
    if arg != "auto":
        return arg
    text = str(bench_arg)
    if text.startswith("world:"):
        return text
    path = Path(text)
    candidate = path.parent / "retention" / f"{path.name}.jsonl"
    return str(candidate) if path.is_dir() and (path.parent / "world.json").exists() and candidate.exists() else None


def retention_set_for(arg: str, bench_arg: str, bench: Benchmark | None = None) -> RetentionSet | None:
    """A ``data.retention`` / ``data.val_retention`` value, loaded: ``none`` -> None; a set argument -> that set;
    ``auto`` -> the embedded world's questions on the images of the benchmark: its retention file for a world split
    (``world:<split>`` or a world's split folder), and for a file of world pairs (a cv fold) the world's questions
    on exactly that file's images, so each fold is measured on its own held-out images; None for other data."""
    resolved = resolve_retention(arg, bench_arg)
    if resolved is not None:
        return load_retention(resolved)
    if arg != "auto" or bench is None:
        return None
    root = world_root_of(bench)
    if root is None:
        return None
    images = {str(bench.resolve_image(ref).resolve()) for ref in bench.unique_images()}
    items = []
    for path in sorted((root / "retention").glob("*.jsonl")):
        questions = load_retention(path)
        items += [item for item in questions.items if str(questions.resolve_image(item.image).resolve()) in images]
    return RetentionSet(items, root / "retention", f"world questions on {bench.name}") if items else None


def retention_sets(cfg: Any, test: Benchmark | None = None, val: Benchmark | None = None
                   ) -> tuple[RetentionSet | None, RetentionSet | None]:
    """The retention set scored before and after training (``data.retention``, on the test side: ``test``'s images
    with ``auto``) and, when the validation loop selects with a retention floor, the validation side's
    (``data.val_retention``)."""
    test_set = retention_set_for(cfg.data.retention, cfg.data.test, test)
    val_set = None
    if cfg.train.selection == "set_accuracy_with_retention_floor":
        val_set = retention_set_for(cfg.data.val_retention, cfg.data.val, val)
        if val_set is None:
            raise ConfigError("train.selection: set_accuracy_with_retention_floor needs retention questions held out on the "
                              f"validation side; data.val_retention={cfg.data.val_retention!r} gives none for "
                              f"data.val={cfg.data.val!r} (auto finds them for the embedded world only)")
        if test_set is not None and val_set.fingerprint() == test_set.fingerprint():
            raise ConfigError("data.val_retention: the same retention set as data.retention; the test side never drives selection")
    return test_set, val_set


def check_toy_data(cfg: Any, benchmark: str | None = None) -> None:
    """A real model (anything but a preset built from config) on the embedded world's 64-px toy
    images measures nothing about it: refused unless ``allow_toy_data``. ``benchmark``: the benchmark a cv
    folds into the config's data (its folds are files, so the data keys alone would not show the world)."""
    preset = find_preset(cfg.model)
    if preset is None and "/" not in str(cfg.model) and not Path(cfg.model).exists():
        resolve_model(cfg.model)  # an unknown name: its one-line error lists the presets
    toy = [f"data.{k}" for k in ("train", "val", "test") if str(getattr(cfg.data, k)).startswith("world:")]
    toy += ["--benchmark"] if str(benchmark or "").startswith("world:") else []
    if toy and not cfg.allow_toy_data and not (preset is not None and preset.build):
        raise ConfigError(f"{', '.join(toy)}: the embedded world's 64-px toy images, with the real model {cfg.model!r}; "
                          "point data.* at held-out real pairs (unconfuse mine, or unconfuse cv on MediConfusion) "
                          "or set allow_toy_data: true")
