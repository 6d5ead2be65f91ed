"""Can a base model's vision tower learn what a world's pairs differ in? A direct-supervision probe.

For each model, its image tower (an MLLM's ``vision_tower``, an open_clip model's ``visual``) gets one linear head
per question type on its mean-pooled image features, and tower and heads are trained on the train pairs' labels
(each image's correct option, the options sorted so a label means the same thing across pairs):
- ``image``: each image classified on its own (binary cross-entropy per image);
- ``pair``: the two images of a pair side by side, the label carried by the difference of their logits (the
  pair shares its source, so the difference isolates the finding, as a hard-negative pair does for CLIP);
- ``frozen``: the tower frozen, a linear probe of what the base already encodes.
Reported on the test pairs: individual accuracy (chance 50) and set accuracy (both images right; per-image
decisions at individual accuracy p give about p squared when errors are independent). This is the upper side of
what a recipe can draw out of a tower with the train pairs alone: a direct, supervised signal.

    python bench/tower_probe.py [--world DIR] [--models tiny-llava-base tiny-clip-base] [--steps 600] [--seed 0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

HEADS = ("frozen", "image", "pair")


def labelled_images(split: Path) -> tuple[list[Path], list[str], list[int]]:
    """The images of ``split``'s pairs in pair order (image 1, image 2), their question type and label (the index
    of the correct option among the pair's two options sorted)."""
    from unconfuse.eval.benchmarks import load_benchmark

    bench = load_benchmark(split)
    paths, kinds, labels = [], [], []
    for pair in bench.pairs:
        for side in (1, 2):
            paths.append(bench.resolve_image(pair.image(side)))
            kinds.append(pair.source or pair.question)
            labels.append(sorted(pair.options).index(pair.options["AB".index(pair.answer(side))]))
    return paths, kinds, labels


def image_tower(name: str):
    """``(tower, pixels, embed)`` of preset ``name``: its image tower module, a function from images to its input
    pixels and one from pixels to a ``[batch, dim]`` embedding."""
    from unconfuse.eval.models import load_model
    from unconfuse.eval.world import prepare

    prepare(models=[name])
    backend, spec = load_model(name, device="cpu")
    if spec.family == "open-clip":
        tower = backend.model.visual
        return tower, lambda images: torch.stack([backend.preprocess(im) for im in images]), tower
    model = backend.model
    modules = dict(model.named_modules())
    tower = modules.get("model.vision_tower", modules.get("vision_tower"))
    if tower is None:
        raise SystemExit(f"{name}: no vision_tower module (the probe takes LLaVA-style towers and open_clip encoders)")

    def pixels(images):
        values = backend.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        if values.dim() != 4:
            raise SystemExit(f"{name}: its processor gives {values.dim()}-d pixels (tiles); the probe takes one view")
        return values.to(tower.dtype)

    return tower, pixels, lambda px: tower(pixel_values=px).last_hidden_state.mean(1)


def probe(name: str, world: Path, head: str, steps: int = 600, lr: float = 1e-3, seed: int = 0,
          batch_pairs: int = 16) -> dict:
    """Train ``name``'s tower (unless ``head`` is frozen) and per-type linear heads on ``world``'s train pairs;
    return train and test individual and set accuracy."""
    from unconfuse.eval.images import load_image

    torch.manual_seed(seed)
    tower, pixels, embed = image_tower(name)
    splits = {split: labelled_images(world / split) for split in ("train", "test")}
    types = sorted(set(splits["train"][1]))
    unknown = set(splits["test"][1]) - set(types)
    if unknown:
        raise SystemExit(f"{world / 'test'}: question type {min(unknown)!r} has no train pairs")
    data = {split: (pixels([load_image(p) for p in paths]), torch.tensor([types.index(k) for k in kinds]),
                    torch.tensor(labels, dtype=torch.float)) for split, (paths, kinds, labels) in splits.items()}
    with torch.no_grad():
        dim = embed(data["train"][0][:2]).shape[-1]
    weight, bias = torch.nn.Parameter(torch.zeros(len(types), dim)), torch.nn.Parameter(torch.zeros(len(types)))
    norm = torch.nn.LayerNorm(dim)
    for p in tower.parameters():
        p.requires_grad_(head != "frozen")
    params = [weight, bias, *norm.parameters()] + (list(tower.parameters()) if head != "frozen" else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def logits(px, kind):
        return (norm(embed(px)) * weight[kind]).sum(-1) + bias[kind]

    def accuracy(split: str) -> dict:
        px, kind, label = data[split]
        tower.eval()
        with torch.no_grad():
            right = ((logits(px, kind) > 0).float() == label).float()
        tower.train(head != "frozen")
        return {"individual": 100 * right.mean().item(), "set": 100 * (right[0::2] * right[1::2]).mean().item()}

    rng = np.random.default_rng(seed)
    n_pairs = len(data["train"][2]) // 2
    tower.train(head != "frozen")
    started, losses = time.perf_counter(), []
    for _ in range(steps):
        pairs = torch.from_numpy(rng.choice(n_pairs, min(batch_pairs, n_pairs), replace=False))
        px, kind, label = data["train"]
        if head == "pair":
            idx = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()
            z = logits(px[idx], kind[idx]).view(-1, 2)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0] - z[:, 1], label[idx].view(-1, 2)[:, 0])
        else:  # images of different pairs, as many as the pair head sees
            idx = torch.from_numpy(rng.choice(len(label), 2 * len(pairs), replace=False))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(px[idx], kind[idx]), label[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"model": name, "head": head, "steps": steps, "seed": seed, "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-20:])) if losses else None, "train": accuracy("train"),
            "test": accuracy("test"), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", help="a world folder (train/, test/); default: the embedded default world")
    ap.add_argument("--models", nargs="+", default=["tiny-llava-base", "tiny-clip-base"])
    ap.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.world:
        world = Path(args.world)
    else:
        from unconfuse.eval.world import default_world

        world = default_world().root
    rows = [probe(m, world, h, args.steps, args.lr, s) for m in args.models for h in args.heads for s in args.seeds]
    print("| model | head | seed | train individual / set | test individual / set | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['head']} | {r['seed']} | {r['train']['individual']:.1f} / {r['train']['set']:.1f} | "
              f"{r['test']['individual']:.1f} / {r['test']['set']:.1f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
