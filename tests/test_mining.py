"""Confusing-pair mining on the embedded world's corpus with the tiny encoders."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from unconfuse.cli.commands import main
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.images import load_image
from unconfuse.eval.models import load_model
from unconfuse.eval.tools.mining import MiningConfig, candidate_pairs, load_corpus, mine, parse_question, select_pairs
from unconfuse.eval.world import default_world, prepare

from .http_stub import StubServer

ENCODERS = ["--encoder-a", "tiny-clip-base", "--encoder-b", "tiny-dinov2"]


@pytest.fixture(scope="module")
def corpus():
    """The default world's corpus, with the encoders the tests mine with (tiny-clip-base pretrains
    for ~2.5 min on a fresh cache: the tests that use it are marked slow)."""
    prepare(models=["tiny-clip-base", "tiny-dinov2"], benchmarks=["world:test"])
    return default_world().corpus


def _embed(model, paths):
    backend, _ = load_model(model)
    return np.concatenate([backend.encode_images([load_image(p) for p in paths[i:i + 64]]).numpy()
                           for i in range(0, len(paths), 64)])


@pytest.mark.parametrize("memory_mapped", [False, True])
def test_blocked_search_equals_brute_force(memory_mapped, tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 16))
    emb = np.concatenate([base, base[:40] + 0.3 * rng.normal(size=(40, 16))])  # near copies: many hits
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    i, j = np.nonzero(np.triu(sims >= 0.9, k=1))
    expected = set(zip(i.tolist(), j.tolist()))
    assert len(expected) > 20
    searched = emb.astype(np.float32)
    if memory_mapped:  # as mining searches: tiles read from an .npy on disk
        np.save(tmp_path / "emb.npy", searched)
        searched = np.load(tmp_path / "emb.npy", mmap_mode="r")
    # faiss: 3 tiles (6 tile pairs, one range search each; OpenMP start-up per call dominates tiny tiles)
    for search, block in (("numpy", 7), ("numpy", 1000), ("faiss", 40)):
        if search == "faiss":
            pytest.importorskip("faiss")
        pairs, found_sims, backend = candidate_pairs(searched, 0.9, block_size=block, search=search)
        assert backend == search
        assert set(map(tuple, pairs.tolist())) == expected
        assert np.allclose(found_sims, sims[pairs[:, 0], pairs[:, 1]], atol=1e-5)


def test_embedding_cache_key_follows_the_weights_not_the_folder(tmp_path):
    """A model rebuilt or retrained in the same folder gets a new cache key (a rebuilt tiny-clip-base once read
    its predecessor's cached embeddings); the same weights copied or re-saved keep theirs."""
    from safetensors.torch import load_file, save_file

    from unconfuse.eval.home import built_model_dir
    from unconfuse.eval.models import resolve_model
    from unconfuse.eval.tools.mining import model_key

    prepare(models=["tiny-clip"])
    folder = tmp_path / "encoder"
    shutil.copytree(built_model_dir("tiny-clip"), folder)
    key = model_key(resolve_model(f"local-dir:{folder}"))
    weights_file = folder / "open_clip_model.safetensors"
    weights = load_file(weights_file)
    save_file(weights, str(weights_file))
    assert model_key(resolve_model(f"local-dir:{folder}")) == key  # same tensors, written again
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(weights_file))
    assert model_key(resolve_model(f"local-dir:{folder}")) != key


def test_select_pairs_caps_images_and_prefers_the_most_confusing():
    pairs = np.array([[0, 1], [0, 2], [1, 2], [3, 4]])
    sim_a = np.array([0.95, 0.99, 0.91, 0.92])
    sim_b = np.array([0.10, 0.20, 0.50, 0.70])
    # confusingness a-b: 0.85, 0.79, 0.41, 0.22 -> keep (0,1); (0,2) blocked by image 0; (1,2) blocked by 1; (3,4)
    assert select_pairs(pairs, sim_a, sim_b, max_per_image=1) == [0, 3]
    assert select_pairs(pairs, sim_a, sim_b, max_per_image=2) == [0, 1, 2, 3]


@pytest.mark.slow
def test_mine_follows_the_rule_on_the_world_corpus(corpus, tmp_path, capsys):
    out = tmp_path / "mined"
    assert main(["mine", "--corpus", str(corpus), "--out", str(out), *ENCODERS, "--min-sim-a", "0.9",
                 "--max-sim-b", "0.6", "--max-pairs-per-image", "2", "--no-exclude", "--search", "numpy",
                 "--block-size", "300"]) == 0
    report = json.loads((out / "mining.json").read_text())
    bench = load_benchmark(out / "pairs.jsonl")
    assert report["pairs"] == len(bench.pairs) > 20
    # the grouped train/val split of the mined pairs: disjoint in images, together all the pairs
    train, val = load_benchmark(out / "train.jsonl"), load_benchmark(out / "val.jsonl")
    assert sorted(p.id for p in train.pairs + val.pairs) == sorted(p.id for p in bench.pairs)
    assert 0 < len(val.pairs) < len(train.pairs) and report["train_val"] == {"train": len(train.pairs), "val": len(val.pairs)}
    assert not {i for p in train.pairs for i in (p.image_1, p.image_2)} & {i for p in val.pairs for i in (p.image_1, p.image_2)}
    items = load_corpus(str(corpus))
    paths = [str(item.path.resolve()) for item in items]
    caption = {str(item.path.resolve()): item.caption for item in items}
    # recompute both similarities independently of the miner
    index = {p: i for i, p in enumerate(paths)}
    used = [index[p.image_1] for p in bench.pairs] + [index[p.image_2] for p in bench.pairs]
    uniq = sorted(set(used))
    emb_a = dict(zip(uniq, _embed("tiny-clip-base", [paths[i] for i in uniq])))
    emb_b = dict(zip(uniq, _embed("tiny-dinov2", [paths[i] for i in uniq])))
    per_image = {}
    letters = set()
    for p in bench.pairs:
        i, j = index[p.image_1], index[p.image_2]
        assert float(emb_a[i] @ emb_a[j]) >= 0.9 - 1e-5 and float(emb_b[i] @ emb_b[j]) <= 0.6 + 1e-5
        assert p.sims["a"] == pytest.approx(float(emb_a[i] @ emb_a[j]), abs=1e-4)
        assert caption[p.image_1] != caption[p.image_2]
        # caption-only record: the options are the two captions, each image's own is correct
        assert p.options[("AB".index(p.answer_1))] == caption[p.image_1] == p.caption_1
        assert p.options[("AB".index(p.answer_2))] == caption[p.image_2]
        letters.add(p.answer_1)
        for k in (i, j):
            per_image[k] = per_image.get(k, 0) + 1
    assert max(per_image.values()) <= 2 and letters == {"A", "B"}
    assert report["candidates_rule"] <= report["candidates_sim_a"]
    # faiss and numpy find the same pairs
    pytest.importorskip("faiss")
    again = mine(MiningConfig(corpus=str(corpus), out=str(tmp_path / "faiss"), encoder_a="tiny-clip-base",
                              encoder_b="tiny-dinov2", min_sim_a=0.9, max_sim_b=0.6, max_pairs_per_image=2,
                              exclude=[], search="faiss"))
    assert again["candidates_sim_a"] == report["candidates_sim_a"] and again["pairs"] == report["pairs"]
    assert (tmp_path / "faiss" / "pairs.jsonl").read_text() == (out / "pairs.jsonl").read_text()


@pytest.mark.slow
def test_approximate_mining_records_its_backend_and_recall(corpus, tmp_path, capsys):
    pytest.importorskip("faiss")
    args = ["--corpus", str(corpus), *ENCODERS, "--min-sim-a", "0.9", "--max-sim-b", "0.6", "--no-exclude"]
    # auto turns approximate above --ivf-above images (the world corpus has 2000)
    assert main(["mine", *args, "--out", str(tmp_path / "ivf"), "--ivf-above", "1000", "--ivf-nprobe", "8"]) == 0
    printed = capsys.readouterr().out
    assert main(["mine", *args, "--out", str(tmp_path / "exact"), "--search", "numpy"]) == 0
    approximate, exact = (json.loads((tmp_path / name / "mining.json").read_text()) for name in ("ivf", "exact"))
    assert approximate["search_backend"] == "ivf" and exact["search_backend"] == "numpy" and exact["approximate"] is None
    recall = approximate["approximate"]
    assert recall["queries"] == 1000 and recall["exact_pairs"] > 50 and recall["recall"] >= 0.95
    assert recall["found_pairs"] == round(recall["recall"] * recall["exact_pairs"])
    assert f"recall {recall['recall']:.4f} of the exact pairs of 1000 random images" in printed
    # approximate only in what it may miss: its candidates are exact ones, and nearly all of them
    assert 0.95 * exact["candidates_sim_a"] <= approximate["candidates_sim_a"] <= exact["candidates_sim_a"]
    mined = load_benchmark(tmp_path / "ivf" / "pairs.jsonl").pairs
    assert len(mined) > 20 and all(p.sims["a"] >= 0.9 and p.sims["b"] <= 0.6 for p in mined)
    assert not list((tmp_path / "ivf").glob(".search-matrix-*"))  # the run-local matrices are removed


@pytest.mark.slow
def test_benchmark_images_and_near_duplicates_are_excluded(corpus, tmp_path):
    world = default_world()
    test = load_benchmark(world.root / "test")
    rows = [json.loads(line) for line in corpus.read_text().splitlines()[:60]]
    records = [{"image": str(world.root / r["image"]), "caption": r["caption"]} for r in rows]
    leaked = [test.resolve_image(ref) for ref in test.unique_images()[:5]]
    for k, src in enumerate(leaked[:3]):  # byte-identical copies
        dst = tmp_path / f"copy-{k}.png"
        shutil.copy(src, dst)
        records.append({"image": str(dst), "caption": f"copied benchmark image {k}"})
    rng = np.random.default_rng(0)
    for k, src in enumerate(leaked[3:]):  # re-encoded with faint noise: different bytes, same picture
        pixels = np.asarray(Image.open(src).convert("RGB")).astype(int) + rng.integers(-2, 3, size=(64, 64, 3))
        dst = tmp_path / f"noisy-{k}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(dst)
        records.append({"image": str(dst), "caption": f"noisy benchmark image {k}"})
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = mine(MiningConfig(corpus=str(corpus_file), out=str(tmp_path / "out"), encoder_a="tiny-clip-base",
                               encoder_b="tiny-dinov2", min_sim_a=0.5, max_sim_b=0.99, exclude=["world:test"],
                               dedup_sim_b=0.999))
    counts = report["leakage"]["benchmarks"]["world:test"]
    assert counts["exact"] == 3
    assert counts["near_duplicate_phash"] + counts["near_duplicate_encoder_b"] >= 2
    mined = (tmp_path / "out" / "pairs.jsonl").read_text()
    assert report["pairs"] > 0 and "copy-" not in mined and "noisy-" not in mined


def test_bad_corpus_rows_are_named(tmp_path, capsys):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n')
    assert main(["mine", "--corpus", str(bad), "--out", str(tmp_path / "o"), *ENCODERS, "--no-exclude"]) == 2
    assert f"{bad}: line 2: missing or empty 'caption'" in capsys.readouterr().err


def test_parse_question_rules():
    good = '{"question": "Where is the lesion?", "option_a": "left", "option_b": "right", "answer_1": "a", "answer_2": "B"}'
    assert parse_question(good)["answer_1"] == "A"
    assert parse_question(good.replace('"a"', '"B"')) is None  # both images the same answer
    assert parse_question("Sure! Here is a question") is None
    assert parse_question('{"question": "Q", "option_a": "x", "option_b": "X", "answer_1": "A", "answer_2": "B"}') is None


@pytest.mark.slow
def test_make_questions_through_an_openai_compatible_stub(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    calls = []

    def handler(method, path, body, headers):
        request = json.loads(body)
        calls.append((path, request, headers.get("authorization")))
        if len(calls) % 3 == 0:  # every third reply is not a usable question
            content = "I cannot help with that."
        else:
            content = json.dumps({"question": f"Question {len(calls)}?", "option_a": "finding present",
                                  "option_b": "finding absent", "answer_1": "B", "answer_2": "A"})
        return 200, json.dumps({"choices": [{"message": {"content": content}}]}).encode(), {"Content-Type": "application/json"}

    with StubServer(handler) as server:
        report = mine(MiningConfig(corpus=str(corpus), out=str(tmp_path / "q"), encoder_a="tiny-clip-base",
                                   encoder_b="tiny-dinov2", min_sim_a=0.9, max_sim_b=0.6, max_pairs_per_image=1,
                                   exclude=[], make_questions=True, llm_url=server.url + "/v1", llm_model="stub-model"))
    asked = report["questions"]["asked"]
    assert asked == len(calls) > 3 and report["questions"]["dropped"] == asked // 3
    assert report["pairs"] == asked - asked // 3
    path, request, auth = calls[0]
    assert path == "/v1/chat/completions" and request["response_format"] == {"type": "json_object"}
    assert request["model"] == "stub-model" and auth == "Bearer sk-test-secret"
    assert "Image 1:" in request["messages"][1]["content"]
    pairs = load_benchmark(tmp_path / "q" / "pairs.jsonl").pairs
    assert all(p.question.startswith("Question ") and (p.answer_1, p.answer_2) == ("B", "A") for p in pairs)
    for name in ("pairs.jsonl", "mining.json"):
        assert "sk-test-secret" not in (tmp_path / "q" / name).read_text()


def test_vectorised_hamming_equals_imagehash():
    import imagehash

    from unconfuse.eval.leakage import min_hamming

    rng = np.random.default_rng(0)
    hashes = [imagehash.phash(Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8))) for _ in range(9)]
    packed = np.stack([np.packbits(h.hash.flatten()) for h in hashes])
    expected = [min(a - b for b in hashes[5:]) for a in hashes[:5]]
    assert min_hamming(packed[:5], packed[5:], block=2).tolist() == expected
    assert min_hamming(packed[:1], packed[:1]).tolist() == [0]


def test_mine_options_come_from_the_config_fields():
    from unconfuse.cli.commands import build_parser
    from unconfuse.eval.options import config_from_args

    args = build_parser().parse_args(["mine", "--corpus", "c", "--out", "o"])
    assert config_from_args(MiningConfig, args, exclude=args.exclude) == MiningConfig("c", "o")
    args = build_parser().parse_args(["mine", "--corpus", "c", "--out", "o", "--exclude", "x", "y", "--search", "numpy",
                                      "--make-questions", "--min-sim-a", "0.8"])
    cfg = config_from_args(MiningConfig, args)
    assert (cfg.exclude, cfg.search, cfg.make_questions, cfg.min_sim_a) == (["x", "y"], "numpy", True, 0.8)
    assert build_parser().parse_args(["mine", "--corpus", "c", "--out", "o", "--no-exclude"]).no_exclude
    args = build_parser().parse_args(["mine", "--corpus", "c", "--out", "o", "--search", "ivf", "--ivf-nprobe", "32",
                                      "--num-workers", "0"])
    cfg = config_from_args(MiningConfig, args)
    assert (cfg.search, cfg.ivf_nprobe, cfg.num_workers, cfg.ivf_nlist) == ("ivf", 32, 0, 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mine", "--corpus", "c", "--out", "o", "--search", "annoy"])
