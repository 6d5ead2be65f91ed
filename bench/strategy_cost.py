"""What a training-free strategy costs per question, against plain scoring of the same model on the same pairs.

Each strategy (``unconfuse eval --strategy``) answers the same questions as plain scoring, in one process, in
interleaved repeats (plain, vcd, describe, retrieve, plain, ...); each repeat starts with empty feature caches and
a fresh strategy (describe's descriptions are made again), and the strategy's setup (retrieve: the encoder's load
and the corpus embeddings, cached on disk after the first) is timed apart. Prints seconds per question and the
ratio to plain per mode (the median of the repeats).

    python bench/strategy_cost.py                                  # small-llava, world:test, 16 pairs
    python bench/strategy_cost.py --model tiny-llava-base --pairs 32 --modes greedy mc
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unconfuse.eval.benchmarks import load_benchmark  # noqa: E402
from unconfuse.eval.evaluation import predict  # noqa: E402
from unconfuse.eval.models import load_model  # noqa: E402
from unconfuse.eval.prompts import load_prompts  # noqa: E402
from unconfuse.eval.strategies import apply_strategy, parse_strategy  # noqa: E402
from unconfuse.eval.world import prepare  # noqa: E402

STRATEGIES = {"plain": [], "vcd": ["alpha=1"], "describe": ["max_new_tokens=32"], "retrieve": ["k=2"]}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-llava")
    parser.add_argument("--benchmark", default="world:test")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["greedy", "mc"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--corpus", default="world:corpus", help="retrieve's corpus")
    parser.add_argument("--encoder", default="tiny-clip-base", help="retrieve's encoder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    prepare(models=[args.model, args.encoder], benchmarks=[args.benchmark, args.corpus])
    options = {**STRATEGIES, "retrieve": [*STRATEGIES["retrieve"], f"corpus={args.corpus}", f"encoder={args.encoder}"]}
    backend, spec = load_model(args.model, device="cpu")
    bench = load_benchmark(args.benchmark).limit(args.pairs)
    prompts = load_prompts()
    questions = 2 * len(bench.pairs)
    table: dict[str, dict[str, float]] = {}
    for mode in args.modes:
        times: dict[str, list[float]] = {name: [] for name in args.strategies}
        setup: dict[str, float] = {}
        for _ in range(args.repeats):
            for name in args.strategies:
                backend.clear_cache()
                start = time.perf_counter()
                wrapped = apply_strategy(backend, parse_strategy(name, options[name]))
                setup[name] = time.perf_counter() - start
                start = time.perf_counter()
                predict(wrapped, spec, mode, bench, prompts, batch_pairs=8)
                times[name].append((time.perf_counter() - start) / questions)
        base = statistics.median(times["plain"]) if "plain" in times else None
        print(f"\n{args.model}, {mode}, {len(bench.pairs)} pairs ({questions} questions), median of {args.repeats}:")
        print(f"{'strategy':<10} {'s/question':>11} {'x plain':>8} {'setup s':>8}")
        for name in args.strategies:
            per = statistics.median(times[name])
            ratio = per / base if base else float("nan")
            table[f"{mode}/{name}"] = {"s_per_question": per, "ratio": ratio, "setup_s": setup[name]}
            print(f"{name:<10} {per:>11.4f} {ratio:>8.2f} {setup[name]:>8.2f}")
    return table


if __name__ == "__main__":
    main()
