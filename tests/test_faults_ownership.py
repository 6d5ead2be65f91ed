"""Fault injection: a folder a command writes is owned (issue 12). Two writers, reruns with other
settings, edited data, folders holding something else, a writer that fails midway: nothing is lost,
nothing is mixed, and the user gets one line naming what happened."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from unconfuse.cli.commands import main

from .interrupt import assert_same_answers

REPO = Path(__file__).resolve().parents[1]


def _eval(bench, out, model="tiny-clip", *extra):
    return main(["eval", "--model", model, "--mode", "clip", "--benchmark", str(bench), "--out", str(out), "--quiet", *extra])


def test_a_second_writer_is_refused_naming_the_holder(world, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from unconfuse.eval.folders import owned_folder\n"
        f"with owned_folder({str(out)!r}, {{'command': 'eval'}}):\n"
        "    print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _eval(world.root / "test", out) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"is being written by pid {holder.pid}" in err and err.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "predictions.jsonl").exists()  # the refused run wrote nothing


def test_an_edited_benchmark_is_not_scored_from_stale_predictions(world, tmp_path, capsys):
    bench = tmp_path / "bench.jsonl"
    rows = (world.root / "test" / "pairs.jsonl").read_text().splitlines()[:4]
    images = world.root / "test"
    pairs = [json.loads(r) for r in rows]
    for pair in pairs:  # absolute image paths: the file can live anywhere
        pair["image_1"], pair["image_2"] = (str((images / pair[k]).resolve()) for k in ("image_1", "image_2"))
    bench.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert _eval(bench, tmp_path / "out") == 0
    pairs[0]["answer_1"], pairs[0]["answer_2"] = pairs[0]["answer_2"], pairs[0]["answer_1"]
    bench.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    capsys.readouterr()
    assert _eval(bench, tmp_path / "out") == 2
    assert "holds another evaluation (data:" in capsys.readouterr().err
    assert _eval(bench, tmp_path / "out", "tiny-clip", "--force") == 0  # afresh; the old run moved aside, not deleted
    aside = list(tmp_path.glob("out.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "predictions.jsonl").exists() and (aside[0] / "results.json").exists()


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(world, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert _eval(world.root / "test", file) == 2
    assert "is a file" in capsys.readouterr().err and file.read_text() == "mine"
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.md").write_text("keep me")
    assert _eval(world.root / "test", folder) == 2
    assert "is not empty and holds no unconfuse evaluation" in capsys.readouterr().err
    assert (folder / "notes.md").read_text() == "keep me" and not (folder / "predictions.jsonl").exists()


def test_synth_never_deletes_what_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "results.json").write_text("{}")
    assert main(["data", "synth", "--out", str(folder), "--pairs", "4"]) == 2
    assert "holds no world" in capsys.readouterr().err and (folder / "results.json").read_text() == "{}"
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["data", "synth", "--out", str(file), "--pairs", "4"]) == 2
    assert "is a file" in capsys.readouterr().err and file.read_text() == "x"


def _train(world, out, *extra):
    return main(["train", "clip_hardneg", "--config", str(REPO / "configs/clip_hardneg/tiny.yaml"), "model=tiny-clip",
                 f"output_dir={out}", "report_to=none", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2",
                 "train.pairs_per_batch=2", *(f"data.{s}={world.root / s}" for s in ("train", "val", "test")), *extra])


@pytest.mark.slow
def test_a_finished_run_is_not_reused_by_another_config(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(world, out) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert _train(world, out, "loss.hardneg_weight=0") == 2
    err = capsys.readouterr().err
    assert "holds another clip_hardneg run (settings.loss.hardneg_weight: 1.0 then 0" in err and err.count("\n") == 1
    assert json.loads((out / "results.json").read_text()) == first  # untouched
    assert _train(world, out, "loss.hardneg_weight=0", "--force") == 0
    second = json.loads((out / "results.json").read_text())
    assert second["strategy"] == "clip-ft+replay"  # the config replays
    assert json.loads(next(tmp_path.glob("run.replaced-*")).joinpath("results.json").read_text()) == first
    # the same finished run: a rerun does nothing, --force redoes it (its first attempt again, the old one aside)
    assert _train(world, out, "loss.hardneg_weight=0") == 0
    assert json.loads((out / "results.json").read_text()) == second
    assert _train(world, out, "loss.hardneg_weight=0", "--force") == 0
    assert len(list(tmp_path.glob("run.replaced-*"))) == 2
    assert json.loads((out / "results.json").read_text())["attempts"] == 1


@pytest.mark.slow
def test_cv_rerun_with_other_overrides_is_refused(world, tmp_path, capsys):
    args = ["cv", "clip_hardneg", "--config", str(REPO / "configs/clip_hardneg/tiny.yaml"), "--folds", "2",
            "--benchmark", str(world.root / "test"), "--out", str(tmp_path / "cv"), "model=tiny-clip", "report_to=none",
            "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "train.pairs_per_batch=2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "train.learning_rate=0.01"]) == 2
    assert "holds another cv of clip_hardneg (settings.train.learning_rate" in capsys.readouterr().err
    assert main(args) == 0  # the same settings resume (every fold reused)


def test_a_writer_failing_midway_keeps_every_line_written(world, tmp_path, monkeypatch):
    """Disk full after two batches: the predictions already written stay, and a rerun completes them to
    exactly what an uninterrupted run writes."""
    from unconfuse.eval import runner

    full = tmp_path / "full"
    assert _eval(world.root / "test", full, "tiny-clip", "--batch-size", "2", "--limit", "8") == 0
    real, calls = runner.answer_pairs, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "answer_pairs", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        runner.run_eval(runner.EvalConfig(model="tiny-clip", mode="clip", benchmark=str(world.root / "test"),
                                          out=str(out), batch_size=2, limit=8, progress=False))
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 2 * 2  # two batches of two pairs
    monkeypatch.setattr(runner, "answer_pairs", real)
    assert _eval(world.root / "test", out, "tiny-clip", "--batch-size", "2", "--limit", "8") == 0
    assert_same_answers(out / "predictions.jsonl", full / "predictions.jsonl")


@pytest.mark.slow
def test_mining_into_a_folder_of_another_mining_run_is_refused(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = []
    for k in range(6):
        pixels = np.random.default_rng(k).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(corpus / f"img{k}.png")
        rows.append({"image": f"img{k}.png", "caption": f"caption {k}"})
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["mine", "--corpus", str(corpus), "--out", str(tmp_path / "mined"), "--encoder-a", "tiny-clip", "--encoder-b",
            "tiny-dinov2", "--no-exclude", "--search", "numpy", "--min-sim-a", "0.0", "--max-sim-b", "1.0"]
    assert main(args) == 0
    pairs = (tmp_path / "mined" / "pairs.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "--seed", "1"]) == 2
    assert "holds another mining (settings.seed: 0 then 1)" in capsys.readouterr().err
    assert (tmp_path / "mined" / "pairs.jsonl").read_text() == pairs
    assert main(args) == 0  # the same settings and corpus: rerun in place
