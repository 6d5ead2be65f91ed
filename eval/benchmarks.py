"""Benchmark arguments: what ``--benchmark`` and the recipes' ``data.*`` accept, resolved to a Benchmark.

``mediconfusion`` (the download under ``$UNCONFUSE_HOME``), a folder, a file, ``hf:<dataset id>``, or
``world:<split>``: a split of the default embedded world, which this module only locates (it is
built by ``unconfuse.eval.world``, which this core never imports).
"""
from __future__ import annotations

from pathlib import Path

from .home import default_world_root, unconfuse_home
from .pairs import (Benchmark, BenchmarkError, load_hf_dataset, load_jsonl, load_upstream_csv,
                    load_upstream_json)

__all__ = ["Benchmark", "BenchmarkError", "load_benchmark"]


def load_benchmark(arg: str | Path, split: str | None = None) -> Benchmark:
    """Resolve a benchmark argument: ``mediconfusion``, a directory, a file, ``hf:<id>``, or
    ``world:<split>`` (a split of the default embedded world, built on first use)."""
    text = str(arg)
    if text.startswith("world:"):
        world = default_world_root()
        root = world / text.split(":", 1)[1]
        if not (world / "world.json").exists():
            raise BenchmarkError(f"{text}: the embedded world is not built in {world}; `unconfuse data synth --out "
                                 f"{world}` builds it (unconfuse commands and recipes build it on first use)")
        if not (root / "pairs.jsonl").exists():
            raise BenchmarkError(f"{text}: the embedded world has no such split (train, val or test)")
        return Benchmark(load_jsonl(root / "pairs.jsonl"), root, text)
    if text == "mediconfusion":
        home = unconfuse_home() / "mediconfusion"
        if not (home / "dataset.json").exists():
            raise BenchmarkError(
                f"MediConfusion is not downloaded (looked in {home}); run "
                f"`unconfuse data download --out {home}` or set UNCONFUSE_HOME")
        return Benchmark(load_upstream_json(home / "dataset.json"), home, "mediconfusion")
    if text.startswith("hf:"):
        pairs, root = load_hf_dataset(text[3:], split=split)
        return Benchmark(pairs, root, text)
    path = Path(text).expanduser()
    if path.is_dir():
        for name, loader in (("pairs.jsonl", load_jsonl), ("dataset.json", load_upstream_json), ("dataset.csv", load_upstream_csv)):
            if (path / name).exists():
                return Benchmark(loader(path / name), path, path.name)
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            pairs, root = load_hf_dataset(str(path), split=split)
            return Benchmark(pairs, root, path.name)
        raise BenchmarkError(f"{path}: no pairs.jsonl, dataset.json, dataset.csv or saved HF dataset in this folder")
    if path.is_file():
        suffix = path.suffix.lower()
        loader = {".jsonl": load_jsonl, ".json": load_upstream_json, ".csv": load_upstream_csv}.get(suffix)
        if loader is None:
            raise BenchmarkError(f"{path}: unknown benchmark file type {suffix!r} (use .jsonl, .json or .csv)")
        return Benchmark(loader(path), path.parent, path.stem)
    raise BenchmarkError(f"benchmark {text!r} not found: give `mediconfusion`, a folder, a file, hf:<dataset id> or world:<split>")
