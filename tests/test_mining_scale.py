"""Mining at corpus scale: sharded embedding cache (kill-safe, DataLoader workers), the exact search
on memory-mapped embeddings, and the approximate (faiss IVF) search and its measured recall."""
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch.utils.data  # noqa: F401  imported before the fork below, so that the child need not import it
from PIL import Image

from unconfuse.eval.tools.mining import EmbeddingCache, MiningError, candidate_pairs, resolve_search, sampled_recall


class PixelEncoder:
    """A stand-in image encoder: the unit-norm 2x2 thumbnail of the image (12-d), deterministic and
    torch-free. ``die_at``: the process kills itself (SIGKILL: no cleanup runs) on that call."""

    def __init__(self, die_at: int | None = None):
        self.calls = 0
        self.die_at = die_at

    def encode_images(self, images):
        self.calls += 1
        if self.calls == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        rows = np.stack([np.asarray(im.resize((2, 2))).astype(np.float32).ravel() - 127.5 for im in images])
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _images(folder, count):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        paths.append(folder / f"img{k}.png")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    return paths, [f"hash{k}" for k in range(count)]


def _embed_until_killed(root, paths, hashes):
    EmbeddingCache(root, "m", shard_size=4).embed(PixelEncoder(die_at=4), hashes, paths, batch_size=2)


def test_a_killed_embedding_keeps_its_full_shards_and_a_rerun_completes(tmp_path):
    paths, hashes = _images(tmp_path, 10)
    root = tmp_path / "cache"
    # batches of 2, shards of 4: batches 1-2 fill a shard (written), batch 3 is buffered, batch 4 kills
    child = multiprocessing.get_context("fork").Process(target=_embed_until_killed, args=(root, paths, hashes))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    cache = EmbeddingCache(root, "m", shard_size=4)
    assert len(cache) == 4 and len(list((root / "m").glob("shard-*.hashes.npy"))) == 1
    assert (cache.locate(hashes)[0] >= 0).tolist() == [True] * 4 + [False] * 6
    encoder = PixelEncoder()
    assert cache.embed(encoder, hashes, paths, batch_size=2) == 6 and encoder.calls == 3  # only the lost ones
    fresh = EmbeddingCache(tmp_path / "fresh", "m")
    fresh.embed(PixelEncoder(), hashes, paths, batch_size=3)
    resumed = cache.matrix(hashes, tmp_path / "resumed.npy")
    assert isinstance(resumed, np.memmap) and np.array_equal(resumed, fresh.matrix(hashes))
    assert np.array_equal(resumed, PixelEncoder().encode_images([Image.open(p).convert("RGB") for p in paths]))
    for a, b in zip(candidate_pairs(resumed, 0.3, 4, "numpy"), candidate_pairs(fresh.matrix(hashes), 0.3, 4, "numpy")):
        assert np.array_equal(a, b)


def test_decoding_workers_give_the_embeddings_of_the_main_process(tmp_path):
    paths, hashes = _images(tmp_path, 9)
    (tmp_path / "img4.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    results = []
    for workers in (0, 2):
        cache, unreadable = EmbeddingCache(tmp_path / f"w{workers}", "m", shard_size=4), {}
        assert cache.embed(PixelEncoder(), hashes, paths, 2, unreadable, num_workers=workers) == 8
        results.append((cache.matrix(hashes), unreadable))
    assert np.array_equal(results[0][0], results[1][0]) and not results[0][0][4].any()  # unreadable: zero row
    assert results[0][1] == results[1][1] and list(results[1][1]) == [str(tmp_path / "img4.png")]
    with pytest.raises(MiningError, match="img4.png"):  # without a record of unreadable images, one is an error
        EmbeddingCache(tmp_path / "strict", "m").embed(PixelEncoder(), hashes, paths, 2, num_workers=2)


def planted(n, dim, pairs, seed=0):
    """n random unit vectors, ``pairs`` of them near copies of others at cosines 0.85-0.99 (spanning 0.9)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    src, dst = rng.permutation(n)[:2 * pairs].reshape(2, pairs)
    cos = rng.uniform(0.85, 0.99, pairs)
    noisy = emb[src] + np.sqrt((1 / cos**2 - 1) / dim)[:, None] * rng.standard_normal((pairs, dim))
    emb[dst] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return emb


def test_approximate_search_finds_the_exact_pairs_and_only_true_ones(tmp_path):
    pytest.importorskip("faiss")
    np.save(tmp_path / "emb.npy", planted(4000, 32, 200))
    emb = np.load(tmp_path / "emb.npy", mmap_mode="r")
    exact, _, _ = candidate_pairs(emb, 0.9, 1024, "numpy")
    assert len(exact) > 80
    found, sims, backend = candidate_pairs(emb, 0.9, 1024, "ivf", nprobe=4)
    assert backend == "ivf" and sims.min() >= 0.9  # every returned pair holds exactly
    assert np.allclose(sims, np.einsum("ij,ij->i", emb[found[:, 0]], emb[found[:, 1]]))
    exact_set, found_set = set(map(tuple, exact.tolist())), set(map(tuple, found.tolist()))
    assert found_set <= exact_set and len(found_set) >= 0.95 * len(exact_set)
    # the recall estimate from sampled rows: 1 for the exact pairs, lower for a search that misses some
    assert sampled_recall(emb, exact, 0.9, 2000)["recall"] == 1.0
    half = sampled_recall(emb, exact[::2], 0.9, 2000)
    assert half["exact_pairs"] > 40 and 0.3 < half["recall"] < 0.7


def test_auto_search_is_approximate_only_above_the_threshold():
    pytest.importorskip("faiss")
    assert resolve_search("auto", 200_000, ivf_above=200_000) == "faiss"
    assert resolve_search("auto", 200_001, ivf_above=200_000) == "ivf"
    assert resolve_search("numpy", 10**7, ivf_above=200_000) == "numpy"
    emb = planted(500, 16, 40)
    assert candidate_pairs(emb, 0.9, 512, "auto", ivf_above=100)[2] == "ivf"
