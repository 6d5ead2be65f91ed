"""Issue 22, one-line errors where users hit them: a config that is not YAML, an override with a bad value, an
unknown model, images missing from training data, a damaged run record, a full disk, a pair whose two options are
the same, and result files a group can read. Each is one line naming the file, key or pair, exit 2, with nothing
written or lost; each test fails on the code before."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.io import atomic_folder, atomic_write_json
from unconfuse.eval.pairs import BenchmarkError


def train(world, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    data = data or world.root
    return ["train", "clip_hardneg", "--output-dir", str(out), "model=tiny-clip", f"data.train={data / 'train'}",
            f"data.val={data / 'val'}", f"data.test={data / 'test'}", "train.max_steps=1", "train.eval_steps=1",
            "train.pairs_per_batch=2", "report_to=none", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("content,message", [
    ("model: tiny-clip\ntrain:\n\tmax_steps: 3\n", r"not valid YAML at line 3, column 1: found character '\t'"),
    ("model: tiny-clip\ntrain:\n  max_steps: 3\n   lr: 2\n", "not valid YAML at line 4, column 6: mapping values are not allowed"),
    (None, "a folder, not a YAML file"),
    ("missing", "no such file"),
])
def test_a_config_that_is_not_a_yaml_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_text(content)
    assert main(["train", "clip_hardneg", "--config", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    line = one_line_error(capsys)
    assert str(path) in line and message.replace("\\t", "\\t") in line
    assert not (tmp_path / "run").exists()


def test_a_bad_override_is_blamed_on_the_override_and_an_unknown_model_lists_the_presets(tmp_path, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs/clip_hardneg/tiny.yaml")
    assert main(["train", "clip_hardneg", "--config", config, "--output-dir", str(tmp_path / "run"), "train.max_steps=ten"]) == 2
    assert "error: override train.max_steps=ten: train.max_steps: expected an integer, got 'ten'" in one_line_error(capsys)
    assert main(["train", "mllm_sft", "--config", config.replace("clip_hardneg", "mllm_sft"), "--output-dir",
                 str(tmp_path / "run"), "model=tiny-lava"]) == 2
    line = one_line_error(capsys)
    assert "unknown model 'tiny-lava': not a preset (" in line and "tiny-llava," in line and "toy" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage,setting", [("train/0", "data.train"), ("val/1", "data.val"), ("replay", "data.replay")])
def test_images_missing_from_training_data_are_found_before_any_model_loads(world, tmp_path, capsys, monkeypatch, damage, setting):
    data = tmp_path / "data"
    shutil.copytree(world.root, data)
    if damage == "replay":  # the world's general data (corpus images), mixed into every batch
        broken = data / json.loads((data / "replay.jsonl").read_text().splitlines()[0])["image"]
        broken.unlink()
    else:
        split, side = damage.split("/")
        pair = json.loads((data / split / "pairs.jsonl").read_text().splitlines()[0])
        broken = (data / split / pair["image_1"]).resolve()
        broken.write_bytes(b"not an image") if side == "1" else broken.unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the images were checked")

    monkeypatch.setattr("unconfuse.eval.models.load_model", no_model)
    monkeypatch.setattr("unconfuse.eval.models.resolve_model", no_model)
    assert main(train(world, tmp_path / "run", "data.replay=auto", data=data)) == 2
    line = one_line_error(capsys)
    assert f"{setting}: 1 image(s) missing or unreadable: " in line and broken.name in line
    assert not (tmp_path / "run").exists()


def test_a_resume_folder_that_is_no_checkpoint_is_one_line_before_any_work(world, tmp_path, capsys):
    assert main(train(world, tmp_path / "run", f"resume_from_checkpoint={tmp_path / 'checkpoint-7'}")) == 2
    assert f"resume_from_checkpoint: {tmp_path / 'checkpoint-7'}: not a complete checkpoint folder" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_damaged_run_record_is_one_line_and_force_starts_afresh(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train(world, out)) == 0
    capsys.readouterr()
    record = out / "fingerprint.json"
    record.write_text(record.read_text()[:40])  # cut short
    assert main(train(world, out)) == 2
    assert f"{out} has an unreadable fingerprint.json" in one_line_error(capsys)
    assert main([*train(world, out), "--force"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 1
    aside = list(tmp_path.glob("run.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "results.json").exists()  # the old run is kept, moved aside


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 29248 vs 29140"),  # torch.save's
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_while_saving_names_the_folder_and_its_free_space(world, tmp_path, capsys, monkeypatch, failure):
    import collections

    import transformers

    def save(self, *args, **kwargs):
        raise failure

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 12 * 2**20, 12 * 2**20))
    out = tmp_path / "run"
    assert main(train(world, out, "train.save_steps=1")) == 2
    line = one_line_error(capsys)
    assert f"no space left on the disk of {out} (12 MB free)" in line and "rerun the same command" in line


def test_a_pair_with_the_same_two_options_is_refused_naming_it(world, tmp_path, capsys):
    rows = [json.loads(line) for line in (world.root / "test" / "pairs.jsonl").read_text().splitlines()]
    rows[2]["option_b"] = " " + rows[2]["option_a"].upper()
    bench = tmp_path / "pairs.jsonl"
    bench.write_text("".join(json.dumps({**r, "image_1": str((world.root / "test" / r["image_1"]).resolve()),
                                         "image_2": str((world.root / "test" / r["image_2"]).resolve())}) + "\n" for r in rows))
    with pytest.raises(BenchmarkError, match=f"line 3: pair '{rows[2]['id']}': option_a and option_b are the same"):
        load_benchmark(str(bench))
    assert main(["eval", "--model", "tiny-clip", "--mode", "clip", "--benchmark", str(bench), "--out", str(tmp_path / "e")]) == 2
    assert f"pair '{rows[2]['id']}'" in capsys.readouterr().err


def test_result_files_and_folders_get_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "results.json", {"a": 1})
        with atomic_folder(tmp_path / "best") as folder:
            (folder / "w").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644  # was 0o600: a group could not read it
    assert (tmp_path / "best").stat().st_mode & 0o777 == 0o755
