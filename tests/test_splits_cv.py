"""Grouped folds on the real MediConfusion text, and `unconfuse cv` on the embedded world."""
import json
from collections import Counter

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.runner import EvalConfig, run_eval
from unconfuse.eval.scorer import read_predictions, resolve_answers, score
from unconfuse.eval.splits import grouped_folds, image_components, image_key


def _images(bench, pairs):
    return {image_key(bench, ref) for p in pairs for ref in (p.image_1, p.image_2)}


@pytest.mark.parametrize("folds,seed", [(5, 0), (5, 1), (3, 0), (10, 0)])
def test_folds_never_share_an_image(mediconfusion_dir, folds, seed):
    bench = load_benchmark(mediconfusion_dir / "dataset.json")
    components = image_components(bench)
    assert (len(bench.pairs), len(components), max(map(len, components))) == (176, 60, 25)
    assignment = grouped_folds(bench, folds, seed)
    by_fold = [[p for p, a in zip(bench.pairs, assignment) if a == f] for f in range(folds)]
    images = [_images(bench, pairs) for pairs in by_fold]
    for f in range(folds):
        for g in range(f + 1, folds):
            assert not images[f] & images[g], (f, g)
    sizes = [len(pairs) for pairs in by_fold]
    assert sum(sizes) == 176 and min(sizes) > 0
    # balanced as far as the components allow: no fold exceeds the mean by more than the largest component
    assert max(sizes) - 176 / folds <= 25


def test_splits_command_writes_folds_and_table(mediconfusion_dir, tmp_path, capsys):
    assert main(["splits", "--benchmark", str(mediconfusion_dir / "dataset.json"), "--folds", "5", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "splits.json").read_text())
    bench = load_benchmark(mediconfusion_dir / "dataset.json")
    folds = [load_benchmark(tmp_path / f"fold-{f}.jsonl") for f in range(5)]
    assert sorted(p.id for fold in folds for p in fold.pairs) == sorted(p.id for p in bench.pairs)
    for f, fold in enumerate(folds):
        assert {summary["assignment"][p.id] for p in fold.pairs} == {f}
        row = summary["table"][f]
        assert row["pairs"] == len(fold.pairs) and row["categories"] == dict(sorted(fold.category_counts().items()))
    total = Counter()
    for row in summary["table"]:
        total.update(row["categories"])
    assert dict(total) == bench.category_counts()
    assert "60 image-sharing components (largest 25 pairs)" in capsys.readouterr().out
    # more folds than components is refused, with the reason
    assert main(["splits", "--benchmark", str(mediconfusion_dir / "dataset.json"), "--folds", "61", "--out", str(tmp_path / "x")]) == 2
    assert "only 60 connected components" in capsys.readouterr().err


@pytest.mark.slow  # pretrains tiny-clip-base (~2.5 min) when the session has not
def test_cv_on_the_world_pools_folds_into_one_scored_run(tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["cv", "clip_hardneg", "--config", "configs/clip_hardneg/tiny.yaml", "--folds", "2", "--benchmark", "world:test",
            "--out", str(out), "train.max_steps=6", "train.eval_steps=3", "train.save_steps=3", "report_to=none",
            "data.retention=world:val"]  # images no fold trains on
    assert main(args) == 0
    bench = load_benchmark("world:test")
    cv = json.loads((out / "results.json").read_text())
    fold_tests = [load_benchmark(out / "splits" / f"fold-{k}" / "test.jsonl") for k in range(2)]
    for k in range(2):
        run = out / f"fold-{k}"
        assert json.loads((run / "leakage.json").read_text())["leak"] is False
        train = load_benchmark(out / "splits" / f"fold-{k}" / "train.jsonl")
        val = load_benchmark(out / "splits" / f"fold-{k}" / "val.jsonl")
        assert not {p.image_1 for p in train.pairs} & {p.image_1 for p in fold_tests[k].pairs}
        assert len(train.pairs) + len(val.pairs) == len(fold_tests[1 - k].pairs)
    assert sorted(p.id for f in fold_tests for p in f.pairs) == sorted(p.id for p in bench.pairs)
    # pooled predictions cover every pair once, and their scores are the scorer's on the whole benchmark
    pooled = read_predictions(out / "test" / "predictions.jsonl")
    assert len(pooled) == 2 * len(bench.pairs)
    rescored = score(bench.pairs, resolve_answers(bench.pairs, pooled))
    assert cv["final"]["set_accuracy"] == pytest.approx(rescored["set_accuracy"])
    fold_scores = [json.loads((out / f"fold-{k}" / "results.json").read_text())["final"]["set_accuracy"] for k in range(2)]
    assert cv["details"]["fold_mean"]["set_accuracy"] == pytest.approx(sum(fold_scores) / 2)
    # the pooled base is the base model evaluated on the whole test split at once
    direct = run_eval(EvalConfig(model="tiny-clip-base", mode="clip", benchmark="world:test", out=str(tmp_path / "direct"),
                                 progress=False))
    assert cv["base"]["set_accuracy"] == pytest.approx(direct["set_accuracy"])
    assert cv["base"]["confusion"] == pytest.approx(direct["confusion"])
    # retention pooled over the folds: every fold's model on the same items, before (the one base) and after
    folds = [json.loads((out / f"fold-{k}" / "results.json").read_text())["retention"]["metrics"]["accuracy"] for k in range(2)]
    pooled_retention = cv["retention"]["metrics"]["accuracy"]
    assert cv["retention"]["runs"] == 2 and pooled_retention["n"] == folds[0]["n"] == folds[1]["n"]
    assert pooled_retention["before"] == pytest.approx(folds[0]["before"]) and folds[0]["before"] == folds[1]["before"]
    assert pooled_retention["after_per_run"] == pytest.approx([f["after"] for f in folds])
    assert pooled_retention["after"] == pytest.approx((folds[0]["after"] + folds[1]["after"]) / 2)
    assert pooled_retention["diff"] == pytest.approx(pooled_retention["after"] - pooled_retention["before"])
    printed = capsys.readouterr().out
    assert "pooled trained (80 pairs)" in printed and "retention (world:val, accuracy" in printed
    # rerun resumes: finished folds are not trained again
    stamp = (out / "fold-0" / "results.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "fold-0" / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_cv_on_world_folds_measures_each_fold_on_its_own_held_out_images(tmp_path, capsys):
    """retention auto on world folds: each fold scores the world's questions on exactly its own test images (so
    every item is held out from the model that answers it); the cv joins them, each item once."""
    from unconfuse.eval.retention import load_retention, read_records
    from unconfuse.eval.world import WorldConfig, synthesize

    world = synthesize(WorldConfig(pairs=30, bases_per_source=8, corpus_size=10, image_size=32), tmp_path / "world")
    out = tmp_path / "cv"
    assert main(["cv", "clip_hardneg", "--config", "configs/clip_hardneg/tiny.yaml", "--folds", "2", "--benchmark",
                 str(world.root / "test"), "--out", str(out), "model=tiny-clip", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2",
                 "train.pairs_per_batch=2", "report_to=none"]) == 0
    questions = load_retention(world.root / "retention" / "test.jsonl")
    fold_ids = []
    for k in range(2):
        test = load_benchmark(out / "splits" / f"fold-{k}" / "test.jsonl")
        images = {str(test.resolve_image(ref).resolve()) for ref in test.unique_images()}
        want = {q.id for q in questions.items if str(questions.resolve_image(q.image).resolve()) in images}
        got = {r["id"] for r in read_records(out / f"fold-{k}" / "retention" / "base.jsonl") if "id" in r}
        assert got == want and want
        fold_ids.append(got)
    assert not fold_ids[0] & fold_ids[1] and fold_ids[0] | fold_ids[1] == {q.id for q in questions.items}
    cv = json.loads((out / "results.json").read_text())["retention"]
    folds = [json.loads((out / f"fold-{k}" / "results.json").read_text())["retention"]["metrics"]["accuracy"] for k in range(2)]
    pooled = cv["metrics"]["accuracy"]
    assert cv["folds"] == 2 and cv["benchmark"] == "per-fold held-out (2 folds)"
    assert pooled["n"] == folds[0]["n"] + folds[1]["n"]
    for key in ("before", "after"):  # item-weighted: every item once
        assert pooled[key] == pytest.approx((folds[0][key] * folds[0]["n"] + folds[1][key] * folds[1]["n"]) / pooled["n"])
    assert "each scored by the fold that held its image out" in capsys.readouterr().out


def test_copies_of_one_picture_under_two_names_are_one_image_to_the_folds(tmp_path):
    """A world renders identical images for different pairs; a benchmark may hold one picture under two file names
    (or re-encoded). The leakage audit compares bytes and pixels, so the folds group by them too."""
    import numpy as np
    from PIL import Image

    from unconfuse.eval.splits import image_components

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
    for k, pixels in enumerate(pictures):
        Image.fromarray(pixels).save(tmp_path / f"img{k}.png")
    (tmp_path / "copy0.png").write_bytes((tmp_path / "img0.png").read_bytes())  # the same bytes, another name
    Image.fromarray(pictures[2]).save(tmp_path / "reencoded2.bmp")  # the same pixels, other bytes
    rows = [("img0.png", "img1.png"), ("copy0.png", "img3.png"), ("img2.png", "img4.png"), ("reencoded2.bmp", "img5.png"),
            ("img1.png", "img4.png")]
    bench_file = tmp_path / "pairs.jsonl"
    bench_file.write_text("".join(json.dumps({"id": f"p{k}", "image_1": a, "image_2": b, "question": "Which?",
                                              "option_a": "x", "option_b": "y", "answer_1": "A", "answer_2": "B"}) + "\n"
                                  for k, (a, b) in enumerate(rows)))
    bench = load_benchmark(str(bench_file))
    assert image_components(bench) == [[0, 1, 2, 3, 4]]  # p0-p1 by bytes, p2-p3 by pixels, p4 joins them by paths
    bench_file.write_text("".join(line for k, line in enumerate(bench_file.read_text().splitlines(True)) if k != 4))
    assert image_components(load_benchmark(str(bench_file))) == [[0, 1], [2, 3]]
