"""Step time of mllm_dpo's image-contrast term against plain DPO.

Three ways, in one process, on one model and the same whole-pair batches, interleaved step by step:
plain TRL DPO (image_contrast_weight 0); DPO + image contrast as mllm_dpo computes it (read off DPO's own
policy and reference forwards: the partner-image rows are the partners' rejected rows); and the old way
(four more forwards on the chosen rows, kept in bench/dpo_reference.py). A step is the loss and its
backward (as TRL's training_step makes them), no optimizer update; medians are printed.

    python bench/dpo_contrast.py                      # the tiny-llava and tiny-llava-next presets, CPU
    python bench/dpo_contrast.py --device cuda --bf16 --width 2048 --layers 8 --heads 16 --vision-width 1024 \
        --vision-layers 12 --image-size 336 --patch-size 14   # random models of that size (576 image tokens)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench.*` from the repository
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from bench.dpo_reference import collate, pair_examples, pair_trainer, separate_loss  # noqa: E402
from unconfuse.eval.models import load_model  # noqa: E402
from unconfuse.eval.world import prepare  # noqa: E402
from unconfuse.eval.world.tiny import BUILDERS  # noqa: E402

PRESETS = {"llava": "tiny-llava", "llava_next": "tiny-llava-next"}


def build(arch: str, args, folder: Path) -> str:
    """The preset, or (with any size option) a random model of the preset's architecture at that size."""
    sizes = {"text_hidden": args.width, "layers": args.layers, "heads": args.heads, "vision_hidden": args.vision_width,
             "vision_layers": args.vision_layers, "image_size": args.image_size, "patch_size": args.patch_size}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if not sizes:
        prepare(models=[PRESETS[arch]])
        return PRESETS[arch]
    BUILDERS[arch](folder, **sizes)
    return str(folder)


def plain_dpo(trainer, batch):
    trainer.image_contrast_weight = 0.0
    return trainer.compute_loss(trainer.model, batch)


def with_image_contrast(trainer, batch):
    trainer.image_contrast_weight = 1.0
    return trainer.compute_loss(trainer.model, batch)


def separate_forwards(trainer, batch):
    return sum(separate_loss(trainer, trainer.model, batch))


WAYS = {"plain DPO": plain_dpo, "DPO + image contrast": with_image_contrast, "separate forwards (old)": separate_forwards}


def step(trainer, batch, loss_of, device: str) -> float:
    """Seconds of one loss + backward (as TRL's training_step makes them)."""
    model = trainer.model
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with trainer.compute_loss_context_manager():
        loss = loss_of(trainer, batch)
    trainer.accelerator.backward(loss)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def measure(arch: str, args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        name = build(arch, args, Path(tmp) / "model")
        backend, _ = load_model(name, device=args.device)
        if args.bf16:  # as mllm_dpo loads with train.bf16
            backend.model.to(torch.bfloat16)
        trainer = pair_trainer(backend, Path(tmp) / "trainer", weight=1.0, pairs_per_batch=args.pairs,
                               device=args.device, bf16=args.bf16)
        rows = pair_examples(args.pairs * args.batches)
        batches = [collate(trainer, rows[2 * args.pairs * b: 2 * args.pairs * (b + 1)]) for b in range(args.batches)]
        ways = list(WAYS)
        for way in ways:  # warm up (first-call costs, allocator)
            step(trainer, batches[0], WAYS[way], args.device)
        times: dict[str, list[float]] = {way: [] for way in ways}
        for i in range(args.steps):
            batch = batches[i % len(batches)]
            shift = i % len(ways)
            for way in ways[shift:] + ways[:shift]:  # rotate the order: shared machines drift
                times[way].append(step(trainer, batch, WAYS[way], args.device))
        model = backend.model
        text = model.config.get_text_config()
        tokens = batches[0]["input_ids"].shape[1]
        print(f"\n{arch}: {name if not Path(name).is_dir() else 'built'} (text width {text.hidden_size}, "
              f"{text.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
              f"{args.pairs} pairs = {4 * args.pairs} DPO rows of ~{tokens} tokens, {args.device}"
              f"{' bf16' if args.bf16 else ''}, {args.steps} steps, torch threads {torch.get_num_threads()}")
        plain = statistics.median(times["plain DPO"])
        for way in ways:
            median = statistics.median(times[way])
            print(f"  {way:26s} {1000 * median:9.1f} ms/step   {median / plain:5.2f}x plain DPO")
        ours = statistics.median(times["DPO + image contrast"])
        print(f"  DPO + image contrast / plain DPO = {ours / plain:.2f}x (goal <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each way")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch (rows: 2 per pair, chosen and rejected)")
    parser.add_argument("--batches", type=int, default=3, help="distinct batches, cycled")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    size = parser.add_argument_group("model size (any of them: a random model of the preset's architecture)")
    for option in ("width", "layers", "heads", "vision-width", "vision-layers", "image-size", "patch-size"):
        size.add_argument(f"--{option}", type=int)
    args = parser.parse_args()
    for arch in args.archs:
        measure(arch, args)


if __name__ == "__main__":
    main()
