"""bench/tower_probe.py: the labels mean one thing across pairs, a frozen tower stays frozen, and the heads can fit
the train pairs (so a probe at chance on the test pairs is the tower's limit, not a broken probe)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import tower_probe


def test_labels_are_the_correct_options_index_among_the_sorted_options(world):
    paths, kinds, labels = tower_probe.labelled_images(world.root / "train")
    rows = [json.loads(line) for line in (world.root / "train" / "pairs.jsonl").read_text().splitlines()]
    assert len(paths) == len(labels) == 2 * len(rows)
    for k, row in enumerate(rows):
        options = sorted([row["option_a"], row["option_b"]])
        for i in (1, 2):
            correct = row["option_a"] if row[f"answer_{i}"] == "A" else row["option_b"]
            assert options[labels[2 * k + i - 1]] == correct and kinds[2 * k + i - 1] == row["source"]
        assert labels[2 * k] != labels[2 * k + 1]  # a pair's two images need different answers


@pytest.mark.slow  # two short trainings per tower (~5 s)
@pytest.mark.parametrize("model", ["tiny-llava", "tiny-clip"])
def test_a_frozen_tower_stays_and_a_trained_one_fits_its_pairs(world, model, monkeypatch):
    loaded = []  # (tower, its weights as loaded)
    real = tower_probe.image_tower

    def recording(name):
        tower, pixels, embed = real(name)
        loaded.append((tower, {k: v.clone() for k, v in tower.state_dict().items()}))
        return tower, pixels, embed

    monkeypatch.setattr(tower_probe, "image_tower", recording)

    def moved(tower, weights):
        return [k for k, v in tower.state_dict().items() if not torch.equal(v, weights[k])]

    frozen = tower_probe.probe(model, world.root, "frozen", steps=3, lr=1e-2)
    assert moved(*loaded[-1]) == [] and frozen["test"]["set"] <= frozen["test"]["individual"] <= 100
    fitted = tower_probe.probe(model, world.root, "pair", steps=40, lr=3e-3)
    assert moved(*loaded[-1])  # the pair head trained the tower
    assert fitted["last_loss"] < fitted["first_loss"] and fitted["train"]["individual"] >= 75, fitted


def test_a_test_question_type_without_train_pairs_is_named(world, tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        rows = (world.root / split / "pairs.jsonl").read_text().splitlines()
        rows = [json.loads(r) for r in rows]
        for r in rows:
            r["image_1"] = str((world.root / split / r["image_1"]).resolve())
            r["image_2"] = str((world.root / split / r["image_2"]).resolve())
            if split == "test":
                r["source"] = "world:unseen"
        (tmp_path / split / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="'world:unseen' has no train pairs"):
        tower_probe.probe("tiny-clip", tmp_path, "frozen", steps=1)
