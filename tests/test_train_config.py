"""Recipe configs: typed, strict, overridable; every shipped config loads."""
import contextlib
import json
from pathlib import Path

import pytest
import yaml

from unconfuse.recipes import RECIPES, recipe_module
from unconfuse.recipes.clip_hardneg import ClipHardNegConfig
from unconfuse.train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE_CONFIGS = {name: recipe_module(name).CONFIG_CLASS for name in RECIPES}


def test_a_config_built_in_python_is_checked_as_yaml_is():
    from unconfuse.recipes.mllm_sft import MllmSftConfig
    from unconfuse.train.config import TrainSettings

    with pytest.raises(ConfigError, match="^max_steps: must be at least 1, got 0$"):
        TrainSettings(max_steps=0)
    with pytest.raises(ConfigError, match="^val_mode: must be one of"):
        MllmSftConfig(val_mode="sing")
    with pytest.raises(ConfigError, match="^model: expected a string"):
        ClipHardNegConfig(model=3)
    assert TrainSettings(learning_rate=1).learning_rate == 1.0 and isinstance(TrainSettings(learning_rate=1).learning_rate, float)


def test_a_shipped_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name resolves to the package's
    cls = RECIPE_CONFIGS["mllm_sft"]
    assert load_config(cls, "mllm_sft/tiny") == load_config(cls, "mllm_sft/tiny.yaml") == \
        load_config(cls, CONFIGS / "mllm_sft" / "tiny.yaml")
    with pytest.raises(ConfigError, match=r"^mllm_sft/tiniest: no such file, nor a shipped config \(shipped here: .*mllm_sft/tiny"):
        load_config(cls, "mllm_sft/tiniest")
    (tmp_path / "mllm_sft").mkdir()
    (tmp_path / "mllm_sft" / "tiny.yaml").write_text("train: {max_steps: 7}\n")
    assert load_config(cls, "mllm_sft/tiny.yaml").train.max_steps == 7  # a path that exists wins


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
    ("", ["train.max_steps=-5"], "train.max_steps: must be at least 1, got -5"),
    ("", ["train.max_steps=0"], "train.max_steps: must be at least 1, got 0"),
    ("", ["train.eval_steps=0"], "train.eval_steps: must be at least 1"),
    ("", ["train.pairs_per_batch=0"], "train.pairs_per_batch: must be at least 1"),
    ("", ["train.learning_rate=0"], "train.learning_rate: must be above 0"),
    ("", ["loss.hardneg_weight=.nan"], "loss.hardneg_weight: must be a finite number"),
    ("", ["loss.hardneg_weight=.inf"], "loss.hardneg_weight: must be a finite number"),
    ("", ["trainable=everything"], "trainable: must be one of 'full', 'locked_text'"),
    ("", ["data.text=captions"], "data.text: must be one of 'option'"),
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
            assert first.startswith(f"# unconfuse train {recipe} --config configs/{recipe}/{path.name}"), path
            load_config(RECIPE_CONFIGS[recipe], path)
            assert all(not line.rstrip().endswith("}") for line in path.read_text().splitlines()), f"{path}: one key per line"
        elif recipe == "studies":  # its configs and overrides check out (paths are from the repository)
            from unconfuse.cli.study import load_study

            with contextlib.chdir(CONFIGS.parent):
                assert first.startswith(f"# unconfuse study plan configs/studies/{path.name}") and load_study(path).strategies
        elif recipe == "accelerate":
            assert data["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
            if data["distributed_type"] == "DEEPSPEED":
                assert (CONFIGS.parent / data["deepspeed_config"]["deepspeed_config_file"]).exists()
    for path in sorted((CONFIGS / "deepspeed").glob("*.json")):
        config = json.loads(path.read_text())
        assert config["train_micro_batch_size_per_gpu"] == "auto"
    zero3 = json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # every recipe has configs, and every recipe folder is a recipe
    assert {p.parent.name for p in yamls} >= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_config_field_documents_itself(recipe, capsys):
    """`unconfuse train RECIPE --help` lists every field (nested ones by dotted key) with its help."""
    import dataclasses
    import typing

    from unconfuse.cli.commands import main

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[f.name]
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(kind):
                yield from keys(kind, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    with pytest.raises(SystemExit) as exit_info:
        main(["train", recipe, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    expected = list(keys(RECIPE_CONFIGS[recipe]))
    assert len(expected) > 20
    for key in expected:
        assert f"\n  {key} (" in printed or f"\n{key} (" in printed, key


def test_real_model_configs_use_real_held_out_data_and_toy_data_is_refused(tmp_path):
    from unconfuse.eval.models import find_preset
    from unconfuse.recipes.clip_hardneg import ClipHardNegConfig
    from unconfuse.train.run_data import check_toy_data

    for recipe, cls in RECIPE_CONFIGS.items():
        for path in sorted((CONFIGS / recipe).glob("*.yaml")):
            cfg = load_config(cls, path)
            preset = find_preset(cfg.model)
            if preset is not None and preset.build:
                continue  # a tiny preset: the embedded world is its data
            assert not any(str(getattr(cfg.data, k)).startswith("world:") for k in ("train", "val", "test")), path
            assert cfg.data.test == "mediconfusion", path
    with pytest.raises(ConfigError, match="data.train, data.val, data.test: the embedded world's 64-px toy images, with the real model 'biomedclip'"):
        check_toy_data(ClipHardNegConfig(model="biomedclip"))
    check_toy_data(ClipHardNegConfig(model="biomedclip", allow_toy_data=True))  # forced
    check_toy_data(ClipHardNegConfig(model="tiny-clip-base"))  # the world's own models
    # a cv folds its --benchmark into the data: a real model's config on world folds is refused too
    real = load_config(ClipHardNegConfig, CONFIGS / "clip_hardneg" / "biomedclip.yaml")
    check_toy_data(real, "mediconfusion")
    with pytest.raises(ConfigError, match="^--benchmark: the embedded world's 64-px toy images, with the real model"):
        check_toy_data(real, "world:test")
    check_toy_data(ClipHardNegConfig(model="tiny-clip-base"), "world:test")


def test_train_help_without_a_recipe_lists_recipes_and_launch(capsys):
    from unconfuse.cli.commands import main

    assert main(["train", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--launch" in printed and all(name in printed for name in RECIPES)
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2 and "a recipe is required" in capsys.readouterr().err
