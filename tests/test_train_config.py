"""Recipe configs: typed, strict, overridable; every shipped config loads."""
import json
from pathlib import Path

import pytest
import yaml

from unconfuse.recipes.clip_hardneg import ClipHardNegConfig
from unconfuse.recipes.mllm_dpo import MllmDpoConfig
from unconfuse.recipes.mllm_sft import MllmSftConfig
from unconfuse.train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE_CONFIGS = {"clip_hardneg": ClipHardNegConfig, "mllm_sft": MllmSftConfig, "mllm_dpo": MllmDpoConfig}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-clip\ntrain: {max_steps: 7, learning_rate: 0.01}\n")
    cfg = load_config(ClipHardNegConfig, path, ["train.max_steps=3", "loss.hardneg_weight=0", "data.text=question_option"])
    assert cfg.train.max_steps == 3 and cfg.train.learning_rate == 0.01 and cfg.loss.hardneg_weight == 0.0
    assert cfg.data.text == "question_option" and cfg.train.pairs_per_batch == 16  # default kept
    assert load_config(ClipHardNegConfig, None, ["train.learning_rate=1e-5"]).train.learning_rate == 1e-5


@pytest.mark.parametrize("content, overrides, message", [
    ("train: {max_stepz: 3}\n", [], "train.max_stepz: unknown key"),
    ("", ["trian.max_steps=3"], "trian: unknown key"),
    ("train: {max_steps: ten}\n", [], "train.max_steps: expected an integer, got 'ten'"),
    ("allow_leakage: 'yes'\n", [], "allow_leakage: expected true or false"),
    ("loss: 3\n", [], "loss: expected a mapping"),
    ("", ["train.max_steps"], "not key=value"),
])
def test_bad_keys_and_types_name_the_key(tmp_path, content, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        load_config(ClipHardNegConfig, path, overrides)


def test_every_shipped_yaml_opens_with_its_command_and_loads():
    yamls = sorted(CONFIGS.rglob("*.yaml"))
    assert len(yamls) > 10
    for path in yamls:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), path
        data = yaml.safe_load(path.read_text())
        recipe = path.parent.name
        if recipe in RECIPE_CONFIGS:
            assert f"--config configs/{recipe}/{path.name}" in path.read_text().splitlines()[0] or "unconfuse train" in first
            load_config(RECIPE_CONFIGS[recipe], path)
        elif recipe == "accelerate":
            assert data["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
            if data["distributed_type"] == "DEEPSPEED":
                assert (CONFIGS.parent / data["deepspeed_config"]["deepspeed_config_file"]).exists()
    for path in sorted((CONFIGS / "deepspeed").glob("*.json")):
        config = json.loads(path.read_text())
        assert config["train_micro_batch_size_per_gpu"] == "auto"
    zero3 = json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
