"""mllm_dpo: the image-contrast term inside TRL's DPOTrainer, on tiny models."""
import json
import math
from pathlib import Path

import pytest
import torch

from unconfuse.eval.world import WorldConfig, synthesize
from unconfuse.recipes import mllm_dpo
from unconfuse.recipes.mllm_dpo import MllmDpoConfig, PreferenceSettings, partner_pixels
from unconfuse.train.config import TrainSettings
from unconfuse.train.mllm import MllmData


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthesize(WorldConfig(pairs=30, bases_per_source=8, corpus_size=10, image_size=32),
                      tmp_path_factory.mktemp("w") / "world")


def config(world, out, model, weight):
    return MllmDpoConfig(
        model=model, output_dir=str(out), report_to="none", val_mode="greedy", test_modes=["greedy"],
        preference=PreferenceSettings(beta=0.1, image_contrast_weight=weight),
        data=MllmData(train=str(world.root / "train"), val=str(world.root / "val"), test=str(world.root / "test")),
        train=TrainSettings(max_steps=2, pairs_per_batch=2, learning_rate=1e-3, warmup_steps=0, eval_steps=2,
                          save_steps=2, logging_steps=1))


def test_partner_pixels_swap_whole_images_of_each_pair():
    rows = torch.arange(8, dtype=torch.float).view(8, 1, 1, 1).expand(8, 3, 2, 2)  # chosen rows 0-3, rejected 4-7
    out = partner_pixels({"input_ids": torch.zeros(8, 5), "pixel_values": rows}, 4)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1, 0, 3, 2]
    grid = torch.tensor([[1, 2, 2]] * 8)  # Qwen2-VL: 4 patches per image, concatenated
    patches = torch.arange(8).repeat_interleave(4).float().unsqueeze(1).expand(32, 6)
    out = partner_pixels({"input_ids": torch.zeros(8, 5), "pixel_values": patches, "image_grid_thw": grid}, 4)
    assert out["pixel_values"][:, 0].tolist() == [1.0] * 4 + [0.0] * 4 + [3.0] * 4 + [2.0] * 4
    with pytest.raises(ValueError, match="one size"):
        partner_pixels({"input_ids": torch.zeros(8, 5), "pixel_values": patches,
                        "image_grid_thw": torch.tensor([[1, 2, 2]] * 3 + [[1, 2, 4]] * 5)}, 4)


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl"])
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_first_step_loss_is_log2_per_term(world, tmp_path, model, weight):
    """At step 1 the adapters are zero, so policy == reference: every preference term is -log sigmoid(0) = log 2."""
    results = mllm_dpo.main(config(world, tmp_path / "run", model, weight))
    assert results.strategy == ("dpo+image-contrast" if weight else "dpo") and results.steps == 2
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    first = next(h for h in state["log_history"] if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2) * (1 + weight), abs=1e-4)
    if weight:
        assert first["image_contrast"] == pytest.approx(math.log(2), abs=1e-4)
    assert (Path(tmp_path / "run" / "checkpoints" / "best" / "adapter_config.json")).exists()
