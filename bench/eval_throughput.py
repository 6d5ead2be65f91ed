"""Eval throughput: our backend against a loop written the way the reference evaluation runs.

The reference asks one image, one prompt, one option per forward, re-encoding the image each
time (``prefix`` runs a full forward per option; ``greedy`` and ``mc`` one call per question).
Our backend batches prompts, encodes each unique image once per pass, and scores options from the
shared prompt's KV cache. Both score the same model on the same benchmark; predictions must be
identical. Prints pairs/s and the ratio per mode.

    python bench/eval_throughput.py                       # small-llava: 196 image tokens, hidden 256
    python bench/eval_throughput.py --model tiny-qwen2-vl --modes prefix greedy
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from unconfuse.eval.images import load_image  # noqa: E402
from unconfuse.eval.models import Query, load_model  # noqa: E402
from unconfuse.eval.benchmarks import load_benchmark  # noqa: E402
from unconfuse.eval.prompts import load_prompts  # noqa: E402
from unconfuse.eval.evaluation import MC_MAX_NEW_TOKENS  # noqa: E402
from unconfuse.eval.world import prepare  # noqa: E402
from unconfuse.eval.world.sample import write_sample_benchmark  # noqa: E402


SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "mediconfusion" / "dataset.json"


def mediconfusion_shaped(out: Path, limit: int) -> Path:
    """MediConfusion's real question text and image-sharing structure (its first ``limit`` pairs),
    each of its image ids drawn as a distinct variant (crop, flip, rotation) of pydicom's real images."""
    import json
    import random

    from PIL import ImageOps

    sample = load_benchmark(write_sample_benchmark(out / "sample"))
    sources = [load_image(sample.resolve_image(ref)) for ref in sample.unique_images()]
    data = json.loads(SHARED_DATASET.read_text())
    keep = dict(list(data.items())[:limit])
    (out / "images").mkdir(parents=True, exist_ok=True)
    for local in sorted({str(v[f"im_{s}_local"]) for v in keep.values() for s in (1, 2)}):
        rng = random.Random(local)
        img = sources[rng.randrange(len(sources))]
        w, h = img.size
        box = (rng.randint(0, w // 8), rng.randint(0, h // 8), w - rng.randint(0, w // 8), h - rng.randint(0, h // 8))
        img = img.crop(box).rotate(rng.choice([0, 90, 180, 270]), expand=True)
        (ImageOps.mirror(img) if rng.random() < 0.5 else img).save(out / "images" / f"{local}.jpg")
    (out / "dataset.json").write_text(json.dumps(keep))
    return out


def build_queries(bench, prompts, mode):
    images = {}
    queries = []
    for pair in bench.pairs:
        for side in (1, 2):
            path = str(bench.resolve_image(pair.image(side)))
            images.setdefault(path, load_image(path))
            prompt = prompts.render(mode, pair.question, pair.options)
            queries.append(Query(path, images[path], prompt, pair.options))
    return queries


# -- the reference way: one forward (or generate) per image, per option; pixels every time ------------

@torch.no_grad()
def reference_greedy(backend, q):
    inputs = backend.processor(text=[backend.render(q.prompt)], images=[q.image], return_tensors="pt")
    logits = backend.model(**inputs).logits[0, -1]
    a, b = backend.letter_token_ids(("A", "B"), q)
    return "A" if logits[a] >= logits[b] else "B"


@torch.no_grad()
def reference_prefix(backend, q):
    scores = []
    for ids in backend.continuation_ids([q], [q.options])[0]:
        inputs = backend.processor(text=[backend.render(q.prompt)], images=[q.image], return_tensors="pt")
        start = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(ids), dtype=torch.long)], 1)
        logprobs = torch.log_softmax(backend.model(**inputs).logits[0].float(), -1)
        scores.append(torch.stack([logprobs[start - 1 + t, tok] for t, tok in enumerate(ids)]).mean().item())
    return "A" if scores[0] > scores[1] else "B"


@torch.no_grad()
def reference_mc(backend, q):
    inputs = backend.processor(text=[backend.render(q.prompt)], images=[q.image], return_tensors="pt")
    out = backend.model.generate(**inputs, max_new_tokens=MC_MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=backend.tokenizer.pad_token_id)
    return backend.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


REFERENCE = {"greedy": reference_greedy, "prefix": reference_prefix, "mc": reference_mc}


def ours(backend, mode, queries, batch_questions):
    backend.clear_cache()  # each pass encodes each unique image once, no more
    answers = []
    for start in range(0, len(queries), batch_questions):
        batch = queries[start:start + batch_questions]
        if mode == "greedy":
            answers += ["A" if a >= b else "B" for a, b in backend.next_token_scores(batch)]
        elif mode == "prefix":
            answers += ["A" if a > b else "B" for a, b in backend.continuation_scores(batch, [q.options for q in batch])]
        else:
            answers += backend.generate(batch, MC_MAX_NEW_TOKENS)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-llava")
    parser.add_argument("--modes", nargs="+", default=["prefix", "greedy", "mc"])
    parser.add_argument("--rounds", type=int, default=2, help="passes over the benchmark per measurement")
    parser.add_argument("--pairs", type=int, default=40, help="MediConfusion pairs to take (when ../shared has its text)")
    parser.add_argument("--batch-pairs", type=int, default=8)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_"))
    if SHARED_DATASET.exists():
        bench = load_benchmark(mediconfusion_shaped(tmp / "mc", args.pairs))
        what = f"MediConfusion's first {len(bench.pairs)} pairs ({len(bench.unique_images())} images; pydicom images stand in)"
    else:
        bench = load_benchmark(write_sample_benchmark(tmp / "sample"))
        what = f"the 6-pair pydicom sample ({len(bench.unique_images())} images)"
    prompts = load_prompts()
    prepare(models=[args.model])
    backend, _ = load_model(args.model, device="cpu")
    config = backend.model.config
    print(f"model {args.model}: {config.image_seq_length if hasattr(config, 'image_seq_length') else '?'} image tokens, "
          f"text hidden {config.text_config.hidden_size}; {what} x {args.rounds} rounds; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'mode':<8} {'reference pairs/s':>18} {'ours pairs/s':>13} {'ratio':>7}  predictions")
    for mode in args.modes:
        queries = build_queries(bench, prompts, mode)
        pairs = len(queries) // 2
        ours(backend, mode, queries[:2], 2)  # warm-up both paths once
        REFERENCE[mode](backend, queries[0])
        ref_time = our_time = 0.0
        for _ in range(args.rounds):  # interleave the two ways so that machine noise hits both alike
            start = time.perf_counter()
            expected = [REFERENCE[mode](backend, q) for q in queries]
            ref_time += time.perf_counter() - start
            start = time.perf_counter()
            got = ours(backend, mode, queries, 2 * args.batch_pairs)
            our_time += time.perf_counter() - start
            assert got == expected, f"{mode}: predictions differ: {[(i, a, b) for i, (a, b) in enumerate(zip(got, expected)) if a != b][:5]}"
        ref_rate, our_rate = pairs * args.rounds / ref_time, pairs * args.rounds / our_time
        print(f"{mode:<8} {ref_rate:18.2f} {our_rate:13.2f} {our_rate / ref_rate:6.2f}x  identical")


if __name__ == "__main__":
    main()
