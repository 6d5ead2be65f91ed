"""GPU smoke test: every MLLM twin at a realistic width, in bf16 on CUDA, through the real code paths.

For each architecture (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Gemma 3, LLaVA-NeXT-Mistral, LLaVA-Med as converted),
a random-weight twin of a few hundred million parameters is built from config, then:
- batching parity: the backend's batched ``next_token_scores`` (8 queries, images of varied sizes)
  against the same queries one at a time (max |delta log-prob|, bf16 weights);
- 20 steps of mllm_sft, mllm_dpo and mllm_dpo with the image-contrast term (bf16, LoRA), each
  run end to end (base score, validation, selected adapters merged and scored);
and prints one table: parameters, parity, steps/s and peak GPU memory per recipe. Random images of
varied sizes stand in for data (no download). Writes ``$OUT/gpu_smoke.json`` when OUT is set.

    python bench/gpu_smoke.py [--width 1024] [--layers 8] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unconfuse.eval.models import Query, load_model  # noqa: E402
from unconfuse.eval.pairs import Pair, write_jsonl  # noqa: E402
from unconfuse.eval.prompts import load_prompts  # noqa: E402
from unconfuse.eval.world.tiny import BUILDERS  # noqa: E402
from unconfuse.recipes import run_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def twin_settings(width: int, layers: int) -> dict[str, dict]:
    """Builder settings per architecture, wide enough to stress the GPU paths."""
    heads = 16  # divides the text width (1024, 1536, 2048) and the vision width (512)
    settings = {
        "llava": {"image_size": 224, "patch_size": 14, "vision_hidden": 512, "vision_layers": 4, "text_hidden": width,
                  "layers": layers, "heads": heads},
        "qwen2_vl": {"image_size": 224, "patch_size": 14, "vision_hidden": 512, "text_hidden": width, "layers": layers,
                     "heads": heads},
        "qwen2_5_vl": {"min_pixels": 112 * 112, "max_pixels": 224 * 224, "vision_hidden": 512, "text_hidden": width,
                       "layers": layers, "heads": heads},
        "gemma3": {"image_size": 224, "patch_size": 14, "mm_tokens_per_image": 64, "vision_hidden": 512,
                   "text_hidden": width, "layers": layers, "heads": heads},
        "llava_next": {"image_size": 112, "patch_size": 14, "vision_hidden": 512, "vision_layers": 4, "text_hidden": width,
                       "layers": layers, "heads": heads},
        "llava_med": {"image_size": 224, "patch_size": 14, "vision_hidden": 512, "vision_layers": 4, "text_hidden": width,
                      "layers": layers, "heads": heads},
    }
    return {arch: s for arch, s in settings.items() if arch in BUILDERS}


def random_pairs(root: Path, n: int, seed: int, sizes: tuple[int, int] = (160, 320)) -> Path:
    """``n`` confusing pairs on random images of varied sizes (each side in ``sizes``, half-open; answers balanced,
    one image per side)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for k in range(n):
        names = []
        for side in (1, 2):
            h, w = int(rng.integers(*sizes)), int(rng.integers(*sizes))
            name = f"images/{k:03d}_{side}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
            names.append(name)
        first = "AB"[k % 2]
        pairs.append(Pair(id=f"g{k:03d}", image_1=names[0], image_2=names[1], question="Which side is the lesion on?",
                          option_a="left", option_b="right", answer_1=first, answer_2="B" if first == "A" else "A"))
    write_jsonl(pairs, root / "pairs.jsonl")
    return root


def parity(folder: Path, data: Path, device: str) -> float:
    """Max |delta log-prob| of the batched backend vs the same queries one at a time."""
    from dataclasses import replace

    from unconfuse.eval.benchmarks import load_benchmark
    from unconfuse.eval.images import load_image
    from unconfuse.eval.models import resolve_model

    backend, _ = load_model(replace(resolve_model(str(folder)), dtype="bfloat16"), device=device)
    bench = load_benchmark(data)
    prompts = load_prompts()
    queries = [Query(str(bench.resolve_image(p.image(s))), load_image(bench.resolve_image(p.image(s))),
                     prompts.render("greedy", p.question, p.options), p.options) for p in bench.pairs[:4] for s in (1, 2)]
    batched = np.array(backend.next_token_scores(queries, ("A", "B")))
    single = np.array([backend.next_token_scores([q], ("A", "B"))[0] for q in queries])
    return float(np.abs(batched - single).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--archs", nargs="*", default=None)
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="check the script itself on a CPU (tiny sizes)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run_on_cpu:
        sys.exit("gpu_smoke.py needs a CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = torch.cuda.max_memory_allocated if device == "cuda" else (lambda: 0)
    os.environ.setdefault("WANDB_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    data = {split: random_pairs(tmp / split, n, seed) for split, n, seed in (("train", 32, 0), ("val", 8, 1), ("test", 8, 2))}
    rows = []
    for arch, settings in twin_settings(args.width, args.layers).items():
        if args.archs and arch not in args.archs:
            continue
        folder = tmp / arch
        try:
            BUILDERS[arch](folder, **settings)
        except Exception as exc:
            print(json.dumps({"arch": arch, "build": f"{type(exc).__name__}: {exc}"[:200]}), flush=True)
            continue
        model = load_model(str(folder), device="cpu")[0].model
        row = {"arch": arch, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
        del model
        try:
            row["parity"] = parity(folder, data["test"], device)
        except Exception as exc:  # a smoke test reports every failure and goes on
            row["parity"] = f"{type(exc).__name__}: {exc}"[:160]
        for name, recipe, extra in (("sft", "mllm_sft", []), ("dpo", "mllm_dpo", ["preference.image_contrast_weight=0"]),
                                    ("dpo+ic", "mllm_dpo", [])):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.time()
            try:
                results = run_recipe(recipe, REPO / "configs" / recipe / "tiny.yaml", [
                    f"model={folder}", f"output_dir={tmp / 'runs' / arch / name}", "report_to=none", f"train.bf16={device == 'cuda'}",
                    f"train.max_steps={args.steps}", "train.eval_steps=10", "train.save_steps=10", "train.logging_steps=5",
                    "train.pairs_per_batch=4", "lora.vision=none", "lora.projector=none", "test_modes=[greedy]",
                    *(f"data.{s}={data[s]}" for s in ("train", "val", "test")), *extra])
                row[name] = {"steps_per_s": round(results.steps / (time.time() - start), 2),
                             "peak_GiB": round(peak() / 2 ** 30, 2),
                             "test_set_accuracy": results.final["set_accuracy"]}
            except Exception as exc:
                row[name] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'arch':<11} {'params M':>8} {'parity':>10} " + " ".join(f"{n:>26}" for n in ("sft", "dpo", "dpo+ic")))
    for row in rows:
        cells = []
        for n in ("sft", "dpo", "dpo+ic"):
            r = row[n]
            cells.append(f"{r['steps_per_s']:>6} it/s {r['peak_GiB']:>6} GiB" if isinstance(r, dict) else "FAILED".rjust(26))
        p = row["parity"]
        print(f"{row['arch']:<11} {row['params_M']:>8} {p if isinstance(p, str) else f'{p:.2e}':>10} " + " ".join(f"{c:>26}" for c in cells))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_smoke.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
