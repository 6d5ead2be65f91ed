"""The embedded world: determinism, disjoint splits, balance, validity, and that it can tell a
confused model from one that learned the findings."""
import json
import shutil
import sys

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.images import check_images
from unconfuse.eval.world import SPLITS, WorldConfig, WorldError, synthesize, verify_world

SMALL = dict(pairs=42, bases_per_source=8, corpus_size=60, image_size=48)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return synthesize(WorldConfig(**SMALL), tmp_path_factory.mktemp("w") / "world")


def test_same_seed_same_bytes_other_seed_other_world(small_world, tmp_path):
    again = synthesize(WorldConfig(**SMALL), tmp_path / "again")
    assert again.manifest["files"] == small_world.manifest["files"]
    assert (again.root / "world.json").read_bytes() == (small_world.root / "world.json").read_bytes()
    other = synthesize(WorldConfig(**SMALL, seed=1), tmp_path / "other")
    assert other.manifest["files"]["test/pairs.jsonl"] != small_world.manifest["files"]["test/pairs.jsonl"]


def test_splits_are_disjoint_in_base_images_and_answers_are_balanced(small_world):
    bases = small_world.manifest["base_images"]
    assert not set(bases["train"]) & set(bases["val"]) and not set(bases["train"]) & set(bases["test"])
    assert not set(bases["val"]) & set(bases["test"])
    corpus = [json.loads(line) for line in small_world.corpus.read_text().splitlines()]
    assert {r["base"] for r in corpus} <= set(bases["train"])  # the corpus never shows a test base image
    option_a, option_b = set(), set()
    for split in SPLITS:
        records = [json.loads(line) for line in (small_world.root / split / "pairs.jsonl").read_text().splitlines()]
        option_a |= {r["option_a"] for r in records}
        option_b |= {r["option_b"] for r in records}
        used = {r[f"base_{s}"] for r in records for s in (1, 2)}
        assert used <= set(bases[split])
        assert all(r["base_1"] != r["base_2"] and r["base_1"].split("-")[0] == r["base_2"].split("-")[0] for r in records)
        answers = [(r["answer_1"], r["answer_2"]) for r in records]
        assert abs(answers.count(("A", "B")) - answers.count(("B", "A"))) <= 1
    assert option_a & option_b  # which option text is A varies, so the letter carries no answer


def test_every_split_loads_and_its_ground_truth_matches_the_options(small_world):
    for split in SPLITS:
        bench = load_benchmark(small_world.root / split)
        assert bench.pairs and not check_images(bench)
        records = {json.loads(l)["id"]: json.loads(l) for l in (small_world.root / split / "pairs.jsonl").read_text().splitlines()}
        for pair in bench.pairs:
            rec = records[pair.id]
            qtype = rec["source"].split(":")[1]
            for side in (1, 2):
                found = rec[f"findings_{side}"]
                correct = pair.options["AB".index(pair.answer(side))]
                if qtype == "presence":
                    assert (correct == "a focal lesion is present") == bool(found["lesions"])
                elif qtype == "count":
                    assert (correct == "two lesions") == (len(found["lesions"]) == 2)
                elif qtype == "line":
                    assert (correct == "a linear structure is present") == found["line"]
                elif qtype == "side":
                    assert correct == f"on the {found['lesions'][0]['side']} side"
                assert pair.categories(side)


def test_a_damaged_world_is_rebuilt_and_an_intact_one_reused(small_world, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_world.root, copy)
    assert verify_world(copy, WorldConfig(**SMALL)) is not None
    stamp = (copy / "world.json").stat().st_mtime_ns
    synthesize(WorldConfig(**SMALL), copy)
    assert (copy / "world.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    victim = sorted((copy / "images").iterdir())[3]
    victim.write_bytes(b"half")
    assert verify_world(copy, WorldConfig(**SMALL)) is None
    rebuilt = synthesize(WorldConfig(**SMALL), copy)
    assert victim.read_bytes() != b"half" and rebuilt.manifest["files"] == small_world.manifest["files"]
    assert verify_world(copy, WorldConfig(**SMALL, seed=3)) is None  # another config is another world


def test_bad_settings_give_clear_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(WorldError, match="--pairs 5000 asks for"):
        synthesize(WorldConfig(**{**SMALL, "pairs": 5000}), tmp_path / "big")
    assert not (tmp_path / "big").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WorldError, match="cannot write the world"):
        synthesize(WorldConfig(**SMALL), blocker / "world")
    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--pairs", "5000", "--bases-per-source", "8"]) == 2
    assert "lower --pairs" in capsys.readouterr().err
    with pytest.raises(WorldError, match="use at least 8"):
        synthesize(WorldConfig(**{**SMALL, "bases_per_source": 5}), tmp_path / "few")
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(WorldError, match="scikit-image"):
        synthesize(WorldConfig(**SMALL), tmp_path / "no-skimage")
    assert not (tmp_path / "no-skimage").exists() and not list(tmp_path.glob(".no-skimage*"))


def test_synth_command_writes_the_contracted_files(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["data", "synth", "--out", str(out), "--pairs", "30", "--bases-per-source", "8", "--corpus-size", "20",
                 "--image-size", "40", "--seed", "7"]) == 0
    for name in ("train/pairs.jsonl", "val/pairs.jsonl", "test/pairs.jsonl", "corpus.jsonl", "world.json"):
        assert (out / name).exists()
    manifest = json.loads((out / "world.json").read_text())
    assert manifest["config"]["seed"] == 7 and manifest["counts"]["corpus"] == 20
    first = json.loads((out / "corpus.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"image", "caption", "modality", "anatomy", "findings"}
    from PIL import Image

    assert Image.open(out / first["image"]).size == (40, 40)


def test_synth_options_default_to_the_default_world():
    from unconfuse.cli.commands import build_parser
    from unconfuse.eval.options import config_from_args

    args = build_parser().parse_args(["data", "synth", "--out", "w"])
    assert config_from_args(WorldConfig, args) == WorldConfig()
    args = build_parser().parse_args(["data", "synth", "--out", "w", "--split-fractions", "0.5", "0.25", "0.25",
                                      "--sources", "cr_chest", "ct_head"])
    cfg = config_from_args(WorldConfig, args)
    assert cfg.split_fractions == (0.5, 0.25, 0.25) and cfg.sources == ("cr_chest", "ct_head")
