"""How the cost of mining's pair search grows with the corpus.

For N random unit embeddings (dimension 512, encoder A and encoder B) it runs the search that
`unconfuse mine` runs (all pairs with cos(A) >= min_sim_a, then cos(B) <= max_sim_b on those), and
prints wall time and peak memory (RSS high-water mark of a fresh process) per N, two ways side by
side: the blocked numpy search and faiss's range search (when installed). Random 512-d unit vectors
have cosines of about N(0, 1/512), so a threshold of 0.9 keeps almost nothing: this measures the
search itself, whose cost is the N^2/2 dot products. Also printed: what the one-matrix search
(N x N similarities at once) would need in memory.

    python bench/mining_scale.py [--sizes 10000 50000 200000] [--min-sim 0.9]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from unconfuse.eval.tools.mining import candidate_pairs
n, dim, min_sim, search, block = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rng = np.random.default_rng(0)
def unit(n):
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
emb_a, emb_b = unit(n), unit(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
pairs, sims, backend = candidate_pairs(emb_a, min_sim, block_size=block, search=search)
sim_b = np.einsum("ij,ij->i", emb_b[pairs[:, 0]], emb_b[pairs[:, 1]]) if len(pairs) else np.zeros(0)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "backend": backend, "seconds": seconds, "pairs": int(len(pairs)),
                  "peak_rss_mb": peak / 1024, "embeddings_mb": 2 * emb_a.nbytes / 2**20,
                  "search_extra_mb": max(0, peak - before) / 1024}))
"""


def measure(n: int, dim: int, min_sim: float, search: str, block: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(dim), str(min_sim), search, str(block)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--min-sim", type=float, default=0.9)
    parser.add_argument("--block-size", type=int, default=4096)
    args = parser.parse_args()
    try:
        import faiss  # noqa: F401

        ways = ["numpy", "faiss"]
    except ImportError:
        ways = ["numpy"]
        print("faiss is not installed: numpy only (pip install faiss-cpu for the second column)")
    print(f"dimension {args.dim}, cos(A) >= {args.min_sim}, blocks of {args.block_size}")
    header = f"{'N':>8} " + " ".join(f"{w + ' s':>10} {w + ' peak MB':>14}" for w in ways)
    header += f" {'faiss/numpy time':>17} {'N x N matrix MB':>16}" if len(ways) == 2 else f" {'N x N matrix MB':>16}"
    print(header)
    previous = None
    for n in args.sizes:
        rows = {w: measure(n, args.dim, args.min_sim, w, args.block_size) for w in ways}
        line = f"{n:>8} " + " ".join(f"{rows[w]['seconds']:>10.2f} {rows[w]['peak_rss_mb']:>14.0f}" for w in ways)
        if len(ways) == 2:
            line += f" {rows['faiss']['seconds'] / rows['numpy']['seconds']:>17.2f}"
        line += f" {n * n * 4 / 2**20:>16.0f}"
        print(line, flush=True)
        if previous:
            p_n, p_s = previous
            growth = rows["numpy"]["seconds"] / p_s
            print(f"{'':>8} numpy time grew {growth:.1f}x for {n / p_n:.0f}x the images ({(n / p_n) ** 2:.0f}x the pairs)")
        previous = (n, rows["numpy"]["seconds"])


if __name__ == "__main__":
    main()
