"""Issue 12, "checks that see what matters": damaged inputs found before any model loads, leaks by
pixels, bad prediction lines, runs of other benchmarks, unreadable corpus images, half-written checkpoints.
Each test fails on the code before these checks."""
import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from unconfuse.cli.commands import main
from unconfuse.eval import runner
from unconfuse.eval.images import check_images
from unconfuse.eval.pairs import Benchmark, Pair
from unconfuse.eval.runner import EvalConfig, run_eval
from unconfuse.eval.scorer import PredictionsError, read_predictions


def _noise(path: Path, seed: int = 0, size: int = 64, fmt: str | None = None) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def _truncated_jpeg(path: Path) -> None:
    _noise(path, fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _bench_file(folder: Path, images: list[tuple[str, str]], name: str = "bench.jsonl", question: str = "Which side?") -> Path:
    rows = [{"id": f"p{k}", "image_1": a, "image_2": b, "question": question, "option_a": "left", "option_b": "right",
             "answer_1": "A", "answer_2": "B"} for k, (a, b) in enumerate(images)]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_model(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("unconfuse.eval.models.load_model", no_model)


# -- the image check ------------------------------------------------------------------------------

def test_truncated_jpeg_is_found_before_any_model_loads(tmp_path, monkeypatch, capsys):
    # PIL's open + verify() read headers only: a JPEG cut in half passed, and crashed after the model loaded
    _noise(tmp_path / "ok.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    bench = _bench_file(tmp_path, [("ok.png", "cut.jpg")])
    _no_model(monkeypatch)
    code = main(["eval", "--model", "tiny-clip", "--mode", "clip", "--benchmark", str(bench), "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"pair p0 image 2: {tmp_path / 'cut.jpg'}: unreadable (OSError: image file is truncated" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: 1 image(s)")


def test_fifo_named_png_is_refused_without_blocking(tmp_path):
    _noise(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading blocks until a writer comes: forever
    bench = Benchmark([Pair("p0", "ok.png", "pipe.png", "Q", "a", "b", "A", "B")], tmp_path, "t")
    found = []
    worker = threading.Thread(target=lambda: found.extend(check_images(bench)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "check_images blocked on a FIFO"
    assert [(p.pair_id, p.side, p.reason) for p in found] == [("p0", 2, "not a regular file")]


def test_every_image_has_a_decode_timeout(tmp_path, monkeypatch):
    _noise(tmp_path / "slow.png")
    _noise(tmp_path / "ok.png", seed=1)
    real = __import__("unconfuse.eval.images", fromlist=["load_image"]).load_image

    def load_image(path):  # a stalled mount or a pathological file
        if Path(path).name == "slow.png":
            time.sleep(3)
        return real(path)

    monkeypatch.setattr("unconfuse.eval.images.load_image", load_image)
    bench = Benchmark([Pair("p0", "slow.png", "ok.png", "Q", "a", "b", "A", "B")], tmp_path, "t")
    start = time.time()
    problems = check_images(bench, timeout_s=0.3)
    assert time.time() - start < 2
    assert [(p.side, p.reason) for p in problems] == [(1, "not decoded within 0.3 s")]


def test_all_image_problems_in_one_message(tmp_path, monkeypatch, capsys):
    _noise(tmp_path / "ok.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "empty.png").write_bytes(b"")
    bench = _bench_file(tmp_path, [("ok.png", "cut.jpg"), ("pipe.png", "ok.png"), ("missing.png", "empty.png")])
    _no_model(monkeypatch)
    code = main(["eval", "--model", "tiny-clip", "--mode", "clip", "--benchmark", str(bench), "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "error: 4 image(s) missing or unreadable" in err
    for name, reason in (("cut.jpg", "unreadable (OSError"), ("pipe.png", "not a regular file"),
                         ("missing.png", "missing"), ("empty.png", "unreadable (UnidentifiedImageError")):
        assert f"{tmp_path / name}: {reason}" in err


# -- leakage ----------------------------------------------------------------------------------------

def _split(folder: Path, names: list[str]) -> Benchmark:
    return Benchmark([Pair(f"p{k}", a, b, "Q", "x", "y", "A", "B") for k, (a, b) in enumerate(zip(names[::2], names[1::2]))],
                     folder, folder.name)


def _leak_folders(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir(), test.mkdir()
    for k in range(4):
        _noise(train / f"t{k}.png", seed=k)
    return train, test


def test_reencoded_copy_of_a_training_image_is_a_leak(tmp_path):
    from unconfuse.eval.leakage import LeakageError, check_leakage

    train, test = _leak_folders(tmp_path)
    pixels = np.asarray(Image.open(train / "t0.png"))
    Image.fromarray(pixels).save(test / "copy.png", compress_level=1, pnginfo=_text_chunk())  # same pixels, other bytes
    assert (test / "copy.png").read_bytes() != (train / "t0.png").read_bytes()
    _noise(test / "new.png", seed=99)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(LeakageError, match=r"\{'test': 1\}"):
        check_leakage(run_dir, _split(train, ["t0.png", "t1.png", "t2.png", "t3.png"]),
                      {"test": _split(test, ["copy.png", "new.png"])}, allow=False)
    report = json.loads((run_dir / "leakage.json").read_text())["splits"]["test"]
    assert report["shared_by_content"] == [] and report["shared_by_pixels"] == [str((test / "copy.png").resolve())]


def _text_chunk():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "re-encoded")
    return info


def test_near_duplicates_are_reported_not_fatal(tmp_path):
    from unconfuse.eval.leakage import check_leakage

    train, test = _leak_folders(tmp_path)
    # a slightly brighter copy of a training image: other pixels, the same perceptual hash
    brighter = np.clip(np.asarray(Image.open(train / "t0.png")).astype(int) + 4, 0, 255).astype(np.uint8)
    Image.fromarray(brighter).save(test / "bright.png")
    _noise(test / "new.png", seed=99)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report = check_leakage(run_dir, _split(train, ["t0.png", "t1.png", "t2.png", "t3.png"]),
                           {"test": _split(test, ["bright.png", "new.png"])}, allow=False)
    assert not report["leak"]
    near = json.loads((run_dir / "leakage.json").read_text())["splits"]["test"]["near_duplicates_phash"]
    assert [(n["image"], n["train_image"]) for n in near] == [(str((test / "bright.png").resolve()),
                                                               str((train / "t0.png").resolve()))]
    assert near[0]["distance"] <= report["phash_distance"]


# -- predictions ------------------------------------------------------------------------------------

def _score_setup(tmp_path):
    bench = _bench_file(tmp_path, [("a.png", "b.png"), ("c.png", "d.png")])
    lines = [{"pair_id": p, "image": s, "answer": "AB"[s - 1]} for p in ("p0", "p1") for s in (1, 2)]
    return bench, lines


def _write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_duplicate_prediction_line_is_an_error(tmp_path, capsys):
    bench, lines = _score_setup(tmp_path)
    preds = _write_lines(tmp_path / "preds.jsonl", lines + [{"pair_id": "p0", "image": 2, "answer": "A"}])  # conflicting
    assert main(["score", "--benchmark", str(bench), "--predictions", str(preds), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {preds}: line 5: second prediction for pair 'p0' image 2 (first on line 2)\n"
    with pytest.raises(PredictionsError, match="line 5: second prediction"):  # the same answer twice, too
        read_predictions(_write_lines(tmp_path / "same.jsonl", lines + [lines[1]]))


def test_unknown_pair_id_is_an_error(tmp_path, capsys):
    bench, lines = _score_setup(tmp_path)
    preds = _write_lines(tmp_path / "preds.jsonl", lines[:2] + [{"pair_id": "zz9", "image": 1, "answer": "A"}] + lines[2:])
    assert main(["score", "--benchmark", str(bench), "--predictions", str(preds), "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == f"error: {preds}: line 3: pair id 'zz9' is not in the benchmark\n"


def test_a_chunk_torn_after_some_lines_resumes_without_duplicates(tmp_path, sample_bench, monkeypatch):
    """A kill can leave part of a batch on disk; the batch is recomputed, and only its missing lines written."""
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = dict(model="tiny-clip", mode="clip", benchmark=str(sample_bench), batch_size=2, progress=False)
    run_eval(EvalConfig(**cfg, out=str(full)))
    full_lines = (full / "predictions.jsonl").read_text().splitlines()
    real, calls = runner.answer_pairs, {"n": 0}

    def dies_after_two_batches(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "answer_pairs", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_eval(EvalConfig(**cfg, out=str(part)))
    with open(part / "predictions.jsonl", "a") as fh:  # the first line of the third batch made it to disk
        fh.write(full_lines[8] + "\n")
    monkeypatch.setattr(runner, "answer_pairs", real)
    resumed = run_eval(EvalConfig(**cfg, out=str(part)))
    assert len((part / "predictions.jsonl").read_text().splitlines()) == 12
    assert resumed["set_accuracy"] == json.loads((full / "results.json").read_text())["set_accuracy"]


# -- compare ----------------------------------------------------------------------------------------

def test_compare_refuses_benchmarks_that_only_share_pair_ids(tmp_path, capsys):
    one = _bench_file(tmp_path, [("a.png", "b.png"), ("c.png", "d.png")], name="one.jsonl")
    other = _bench_file(tmp_path, [("a.png", "b.png"), ("c.png", "d.png")], name="other.jsonl", question="Which organ?")
    _, lines = _score_setup(tmp_path)
    preds = _write_lines(tmp_path / "preds.jsonl", lines)
    for name, bench in (("base", one), ("run", other)):
        assert main(["score", "--benchmark", str(bench), "--predictions", str(preds), "--out", str(tmp_path / name)]) == 0
    scored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(scored["benchmark_fingerprint"]) == 16
    capsys.readouterr()
    code = main(["compare", str(tmp_path / "run"), "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "cmp").exists()
    assert err.startswith(f"error: {tmp_path / 'run'} was scored on benchmark {other} (fingerprint ")
    assert f"the baseline {tmp_path / 'base'} ({one}) is another" in err
    # the same benchmark twice compares
    assert main(["score", "--benchmark", str(one), "--predictions", str(preds), "--out", str(tmp_path / "run2")]) == 0
    assert main(["compare", str(tmp_path / "run2"), "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "cmp")]) == 0


def test_compare_checks_runs_that_recorded_no_fingerprint(tmp_path, capsys):
    from unconfuse.eval.runs import RunResults, write_run_results

    one = _bench_file(tmp_path, [("a.png", "b.png"), ("c.png", "d.png")], name="one.jsonl")
    other = _bench_file(tmp_path, [("a.png", "b.png"), ("c.png", "d.png")], name="other.jsonl", question="Which organ?")
    _, lines = _score_setup(tmp_path)
    for name, bench in (("base", one), ("run", other)):  # recipe runs written before scored folders had fingerprints
        (tmp_path / name / "test").mkdir(parents=True)
        _write_lines(tmp_path / name / "test" / "predictions.jsonl", lines)
        write_run_results(tmp_path / name, RunResults(
            kind="run", recipe="clip_hardneg", strategy=name, model="tiny", train_data="world:train",
            test_data=str(bench), seed=0, mode="clip", base={}, final={}, steps=2, best_step=2, best_val=None,
            wall_time_s=1.0, scorer_version="x", prompt_version=None))
    code = main(["compare", str(tmp_path / "run"), "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "cmp")])
    assert code == 2 and f"{tmp_path / 'run'} was scored on benchmark {other}" in capsys.readouterr().err


# -- mining -----------------------------------------------------------------------------------------

def test_mining_skips_and_lists_unreadable_corpus_images(tmp_path, capsys):
    from unconfuse.eval.home import unconfuse_home

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = []
    for k in range(6):
        _noise(corpus / f"img{k}.png", seed=100 + k, size=32)
        rows.append({"image": f"img{k}.png", "caption": f"caption {k}"})
    _truncated_jpeg(corpus / "cut.jpg")
    os.mkfifo(corpus / "pipe.png")
    rows += [{"image": "cut.jpg", "caption": "cut"}, {"image": "pipe.png", "caption": "pipe"}]
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mined"
    code = main(["mine", "--corpus", str(corpus), "--out", str(out), "--encoder-a", "tiny-clip", "--encoder-b",
                 "tiny-dinov2", "--no-exclude", "--search", "numpy", "--min-sim-a", "0.0", "--max-sim-b", "1.0"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "mining.json").read_text())
    assert report["corpus_images"] == 8 and report["unreadable_images"] == 2
    assert [(u["image"], u["reason"].split(" ")[0]) for u in report["unreadable"]] == [
        (str(corpus / "cut.jpg"), "unreadable"), (str(corpus / "pipe.png"), "not")]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    used = {p["image_1"] for p in pairs} | {p["image_2"] for p in pairs}
    assert len(used) == 6 and not used & {str(corpus / "cut.jpg"), str(corpus / "pipe.png")}
    assert "2 unreadable (skipped, listed in mining.json)" in capsys.readouterr().out
    # the readable images' embeddings are cached for the next run
    cached = [np.load(s).tolist() for s in (unconfuse_home() / "embeddings").glob("tiny-clip-*/shard-*.hashes.npy")]
    from unconfuse.eval.io import sha256_file

    assert sha256_file(corpus / "img0.png").encode() in {h for shard in cached for h in shard}


def test_embeddings_computed_before_a_crash_are_kept(tmp_path):
    import torch

    from unconfuse.eval.tools.mining import EmbeddingCache

    paths = []
    for k in range(4):
        paths.append(tmp_path / f"i{k}.png")
        _noise(paths[-1], seed=k, size=8)

    class DiesOnSecondBatch:
        calls = 0

        def encode_images(self, images):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("CUDA out of memory")
            return torch.ones(len(images), 3)

    cache = EmbeddingCache(tmp_path / "cache", "m")
    hashes = [f"h{k}" for k in range(4)]
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.embed(DiesOnSecondBatch(), hashes, paths, batch_size=2)
    assert (EmbeddingCache(tmp_path / "cache", "m").locate(hashes)[0] >= 0).tolist() == [True, True, False, False]


# -- resume_from_checkpoint: auto / latest -------------------------------------------------------------------

def _checkpoint(root: Path, step: int, state: str | None = '{"global_step": 1}', weights: str | None = "model.safetensors"):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    if weights is not None:
        (folder / weights).write_bytes(b"w")
    return folder


def test_latest_skips_checkpoints_a_killed_save_left_behind(tmp_path, capsys):
    from unconfuse.train.lifecycle import fit

    root = tmp_path / "run" / "checkpoints"
    _checkpoint(root, 2, weights="adapter_model.safetensors")
    good = _checkpoint(root, 10)
    _checkpoint(root, 12, state=None)  # killed before trainer_state.json (written last)
    _checkpoint(root, 14, weights=None)  # weights gone
    _checkpoint(root, 16, state='{"global_st')  # killed while writing trainer_state.json
    shard = _checkpoint(root, 18, weights="model.safetensors.index.json")
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                                 "b": "model-00002-of-00002.safetensors"}}))
    (shard / "model-00001-of-00002.safetensors").write_bytes(b"w")  # the second shard was never written
    (root / "best").mkdir()

    calls = []
    trainer = SimpleNamespace(add_callback=lambda cb: None, remove_callback=lambda cb: None,
                              train=lambda **kw: calls.append(kw),
                              accelerator=SimpleNamespace(wait_for_everyone=lambda: None))
    cfg = SimpleNamespace(resume_from_checkpoint="auto", train=SimpleNamespace(learning_rate=1e-4, max_steps=20))
    fit(SimpleNamespace(cfg=cfg, dir=tmp_path / "run", is_main=True), trainer)
    assert calls == [{"resume_from_checkpoint": str(good)}]
    err = capsys.readouterr().err
    assert all(f"skipping {root / f'checkpoint-{n}'}" in err for n in (12, 14, 16, 18))

    shutil.rmtree(root)
    _checkpoint(root, 4, state=None)  # nothing complete: train from the start, and say so
    fit(SimpleNamespace(cfg=cfg, dir=tmp_path / "run", is_main=True), trainer)
    assert calls[-1] == {"resume_from_checkpoint": None}
    assert "no complete checkpoint" in capsys.readouterr().err
