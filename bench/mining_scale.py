"""How the cost of mining's pair search grows with the corpus, exact and approximate.

For N random unit embeddings (dimension 512, encoder A and encoder B), written to .npy files and
memory-mapped as `unconfuse mine` has them, it runs the search that mining runs (all pairs with
cos(A) >= min_sim_a, then cos(B) on those) in a fresh process per N and way, and prints wall time,
peak memory (RSS high-water mark, memory-mapped pages that were read included) and CPU time:

- numpy, faiss: the exact tiled search (N^2/2 dot products), up to --exact-max images;
- ivf: the approximate faiss IVF index (8-bit codes) that `--search auto` runs above 200k images.

Random 512-d vectors have cosines of about N(0, 1/512): none reach 0.9. So N/200 near copies are
planted (cosines 0.85-0.99, spanning the threshold) and the recall of ivf is printed twice: against
the exact search where it ran, and against the planted pairs that hold (every N). Also printed:
what the one-matrix search (N x N similarities at once) would need in memory.

    python bench/mining_scale.py                                       # 10k, 100k (both ways + ivf), 1M (ivf)
    python bench/mining_scale.py --sizes 10000 50000 200000 --ways numpy faiss   # the exact ways only
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

GENERATE = r"""
import sys
import numpy as np
folder, n, dim, planted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
for name in ("a", "b"):
    out = np.lib.format.open_memmap(f"{folder}/{name}.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 65536):
        x = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
        out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
# near copies in A: row dst = src plus noise at a chosen cosine (their B rows stay random: apart)
emb = np.lib.format.open_memmap(f"{folder}/a.npy", mode="r+")
src, dst = rng.permutation(n)[:2 * planted].reshape(2, planted)
cos = rng.uniform(0.85, 0.99, planted)
noisy = emb[src] + np.sqrt((1 / cos**2 - 1) / dim)[:, None].astype(np.float32) * rng.standard_normal((planted, dim), dtype=np.float32)
emb[dst] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
emb.flush()
np.save(f"{folder}/planted.npy", np.sort(np.stack([src, dst], axis=1), axis=1))
np.save(f"{folder}/planted-cos.npy", np.einsum("ij,ij->i", emb[src], emb[dst]))
"""

MEASURE = r"""
import json, resource, sys, time
import numpy as np
from unconfuse.eval.tools.mining import candidate_pairs, pair_cosines
folder, min_sim, search, block, nlist, nprobe = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
emb_a, emb_b = np.load(f"{folder}/a.npy", mmap_mode="r"), np.load(f"{folder}/b.npy", mmap_mode="r")
start = time.perf_counter()
pairs, sims, backend = candidate_pairs(emb_a, min_sim, block_size=block, search=search, nlist=nlist, nprobe=nprobe)
sim_b = pair_cosines(emb_b, pairs)
seconds = time.perf_counter() - start
np.save(f"{folder}/pairs-{search}.npy", pairs)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"backend": backend, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "pairs": int(len(pairs)), "peak_rss_mb": usage.ru_maxrss / 1024}))
"""


def child(script: str, *args) -> str:
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def recall(found: np.ndarray, truth: np.ndarray) -> float | None:
    keys = lambda p: set(map(tuple, p.tolist()))  # noqa: E731
    truth_set = keys(truth)
    return len(keys(found) & truth_set) / len(truth_set) if truth_set else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ways", nargs="+", default=["numpy", "faiss", "ivf"], choices=["numpy", "faiss", "ivf"])
    parser.add_argument("--exact-max", type=int, default=200_000, help="largest N the exact ways run at")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--min-sim", type=float, default=0.9)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--nlist", type=int, default=0, help="ivf lists (0: mining's default, about 2 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=8, help="ivf lists searched per query (mining's default 8)")
    parser.add_argument("--workdir", default=None, help="where the embeddings are written (default: a temporary folder)")
    args = parser.parse_args()
    ways = list(args.ways)
    try:
        import faiss  # noqa: F401
    except ImportError:
        ways = [w for w in ways if w == "numpy"]
        print("faiss is not installed: numpy only (pip install faiss-cpu for faiss and ivf)")
    print(f"dimension {args.dim}, cos(A) >= {args.min_sim}, blocks of {args.block_size}, ivf nprobe {args.nprobe}; "
          "N/200 planted near copies; peak RSS in MB, fresh process per N and way")
    header = f"{'N':>8} " + " ".join(f"{w + ' s':>9} {w + ' MB':>8}" for w in ways)
    if {"numpy", "faiss"} <= set(ways):
        header += f" {'faiss/numpy':>11}"
    if "ivf" in ways:
        header += f" {'ivf recall vs exact':>19} {'vs planted':>10}"
    header += f" {'pairs':>6} {'N x N matrix MB':>16}"
    print(header)
    previous = None
    for n in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"mining-scale-{n}-", dir=args.workdir))
        try:
            child(GENERATE, folder, n, args.dim, n // 200)
            rows = {w: json.loads(child(MEASURE, folder, args.min_sim, w, args.block_size, args.nlist, args.nprobe)
                                  .strip().splitlines()[-1])
                    for w in ways if w == "ivf" or n <= args.exact_max}
            found = {w: np.load(folder / f"pairs-{w}.npy") for w in rows}
            # the planted pairs that hold: 2N/200 distinct rows, so no chains, and random pairs never reach 0.9 at 512-d
            planted = np.load(folder / "planted.npy")[np.load(folder / "planted-cos.npy") >= args.min_sim]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        line = f"{n:>8} " + " ".join(f"{rows[w]['seconds']:>9.1f} {rows[w]['peak_rss_mb']:>8.0f}" if w in rows
                                      else f"{'-':>9} {'-':>8}" for w in ways)
        if {"numpy", "faiss"} <= set(ways):
            line += f" {rows['faiss']['seconds'] / rows['numpy']['seconds']:>11.2f}" if "numpy" in rows else f" {'-':>11}"
        exact = next((found[w] for w in ("numpy", "faiss") if w in found), None)
        if "ivf" in ways:
            vs_exact = recall(found["ivf"], exact) if exact is not None else None
            vs_planted = recall(found["ivf"], planted)
            line += f" {'-' if vs_exact is None else f'{vs_exact:.4f}':>19} {'-' if vs_planted is None else f'{vs_planted:.4f}':>10}"
        line += f" {len(next(iter(found.values()))):>6} {n * n * 4 / 2**20:>16.0f}"
        print(line, flush=True)
        # on a shared machine wall time depends on the load; CPU time (all threads, process total) less so
        print(f"{'':>8} CPU s: " + ", ".join(f"{w} {rows[w]['cpu_seconds']:.0f}" for w in rows), flush=True)
        if previous and "numpy" in rows:
            p_n, p_s = previous
            growth = rows["numpy"]["seconds"] / p_s
            print(f"{'':>8} numpy time grew {growth:.1f}x for {n / p_n:.0f}x the images ({(n / p_n) ** 2:.0f}x the pairs)")
        previous = (n, rows["numpy"]["seconds"]) if "numpy" in rows else previous


if __name__ == "__main__":
    main()
