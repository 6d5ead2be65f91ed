"""Grouped folds over a benchmark: pairs that share an image always land in the same fold.

MediConfusion reuses images across pairs (one image is in 14 pairs), so a split by pair leaks:
the folds here are made of connected components of the image-sharing graph, balanced greedily
in pair count and, as far as the components allow, in category.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .pairs import Benchmark, Pair


def image_key(bench: Benchmark, ref: str) -> str:
    """One key per image: its resolved path, so two references to one file are one image."""
    return str(bench.resolve_image(ref).resolve())


def image_identities(bench: Benchmark, ref: str, cache: dict[str, list[str]]) -> list[str]:
    """Every identity an image has that the leakage audit compares: its resolved path, its bytes (sha256) and its
    decoded pixels (a re-encoded copy), so that two files of one picture are one image to the splits too (a
    world renders identical images for different pairs; a benchmark may hold one picture under two names)."""
    from .images import UnreadableImage, decode_image, pixel_digest
    from .io import sha256_file

    path = image_key(bench, ref)
    if path not in cache:
        cache[path] = [f"path:{path}"]
        if Path(path).is_file():
            cache[path].append(f"bytes:{sha256_file(path)}")
            try:
                cache[path].append(f"pixels:{pixel_digest(decode_image(path))}")
            except UnreadableImage:
                pass  # eval and training refuse it, naming it
    return cache[path]


def image_components(bench: Benchmark) -> list[list[int]]:
    """Connected components of the image-sharing graph, as lists of pair indices (each ascending): pairs that
    share an image (by path, bytes or pixels: ``image_identities``) are one component. Components are ordered
    by their first pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(bench.pairs)
    if n == 0:
        return []
    images: dict[str, int] = {}
    identities: dict[str, list[str]] = {}
    rows, cols = [], []
    for i, pair in enumerate(bench.pairs):
        for ref in (pair.image_1, pair.image_2):
            for identity in image_identities(bench, ref, identities):
                rows.append(i)
                cols.append(n + images.setdefault(identity, len(images)))
    # bipartite graph: pairs are nodes 0..n-1, images n..n+m-1, an edge per pair-image reference
    size = n + len(images)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels[:n].tolist()):
        groups.setdefault(label, []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _pair_categories(pair: Pair) -> Counter:
    return Counter(pair.categories_1 + pair.categories_2)


def grouped_folds(bench: Benchmark, folds: int, seed: int = 0, components: list[list[int]] | None = None) -> list[int]:
    """The fold of every pair. Components go, largest first (ties in a seeded random order), to the
    fold where they raise the load least: pair count relative to the target, plus half the mean
    relative load of the categories they carry. ``components``: ``image_components(bench)`` if
    already computed."""
    components = components if components is not None else image_components(bench)
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if folds > len(components):
        raise ValueError(f"{bench.name}: {folds} folds asked but the image-sharing graph has only "
                         f"{len(components)} connected components")
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(components))
    order = sorted(range(len(components)), key=lambda c: (-len(components[c]), tiebreak[c]))
    totals = Counter()
    for pair in bench.pairs:
        totals.update(_pair_categories(pair))
    target_pairs = len(bench.pairs) / folds
    pair_load = np.zeros(folds)
    category_load = [Counter() for _ in range(folds)]
    assignment = [-1] * len(bench.pairs)
    for c in order:
        members = components[c]
        cats = Counter()
        for i in members:
            cats.update(_pair_categories(bench.pairs[i]))
        costs = []
        for f in range(folds):
            cost = (pair_load[f] + len(members)) / target_pairs
            if cats:
                cost += 0.5 * float(np.mean([(category_load[f][k] + n) / (totals[k] / folds) for k, n in cats.items()]))
            costs.append((cost, f))
        _, best = min(costs)
        pair_load[best] += len(members)
        category_load[best].update(cats)
        for i in members:
            assignment[i] = best
    return assignment


def fold_table(bench: Benchmark, assignment: list[int], folds: int, components: list[list[int]]) -> list[dict[str, Any]]:
    """Per fold: pairs, distinct images, components, and image-side category counts."""
    rows = []
    for f in range(folds):
        pairs = [p for p, a in zip(bench.pairs, assignment) if a == f]
        cats = Counter()
        for pair in pairs:
            cats.update(_pair_categories(pair))
        images = {image_key(bench, ref) for p in pairs for ref in (p.image_1, p.image_2)}
        rows.append({"fold": f, "pairs": len(pairs), "images": len(images),
                     "components": sum(1 for comp in components if assignment[comp[0]] == f),
                     "categories": dict(sorted(cats.items()))})
    return rows


def fold_benchmark(bench: Benchmark, assignment: list[int], folds: set[int] | list[int], name: str) -> Benchmark:
    """The pairs of the given folds, with image references made absolute so the fold loads anywhere."""
    from dataclasses import replace

    wanted = set(folds)
    pairs = [replace(p, image_1=str(bench.resolve_image(p.image_1).resolve()),
                     image_2=str(bench.resolve_image(p.image_2).resolve()))
             for p, a in zip(bench.pairs, assignment) if a in wanted]
    return Benchmark(pairs, bench.image_root, name)


def write_splits(bench: Benchmark, folds: int, out: str | Path, seed: int = 0) -> dict[str, Any]:
    """``out/fold-<k>.jsonl`` per fold and ``out/splits.json`` (assignment, per-fold table, settings)."""
    from .io import atomic_write_json
    from .pairs import write_jsonl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    components = image_components(bench)
    assignment = grouped_folds(bench, folds, seed, components)
    for f in range(folds):
        write_jsonl(fold_benchmark(bench, assignment, [f], f"fold-{f}").pairs, out / f"fold-{f}.jsonl")
    summary = {"benchmark": bench.name, "image_root": str(bench.image_root), "folds": folds, "seed": seed,
               "pairs": len(bench.pairs), "components": len(components),
               "largest_component": max(len(c) for c in components),
               "assignment": {p.id: a for p, a in zip(bench.pairs, assignment)},
               "table": fold_table(bench, assignment, folds, components),
               "files": [f"fold-{f}.jsonl" for f in range(folds)]}
    atomic_write_json(out / "splits.json", summary)
    return summary
