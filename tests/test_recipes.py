"""Every recipe in RECIPES, two steps on a tiny model: one run-directory shape, golden losses, compare reads it.

Torchtune-style golden numbers: the losses logged at steps 1 and 2 of each recipe's shipped tiny config
(its random-weight twin, a small world, two pairs per batch). A change to data order, loss, LoRA init
or the model code moves them; update them only when that change is meant.
"""
import json
from pathlib import Path

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval.runs import read_run_results, read_scored
from unconfuse.eval.tools.compare import run_compare
from unconfuse.recipes import RECIPES, run_recipe

REPO = Path(__file__).resolve().parents[1]
RANDOM_TWIN = {"tiny-clip-base": "tiny-clip", "tiny-llava-base": "tiny-llava"}  # pretrained base -> random twin
GOLDEN_LOSSES = {  # recipe -> losses logged at steps 1 and 2
    "clip_hardneg": (2.2614, 2.1262),  # with the world's replay (corpus captions and answers), as the config ships
    "mllm_sft": (6.0145, 5.9794),
    "mllm_dpo": (1.3863, 1.4099),  # step 1: policy == reference, so DPO and the image-contrast term are log 2 each
    "mllm_grpo": (0.0, 0.0),  # on-policy, beta 0: the surrogate is -mean(advantage), 0 (centred per image); see test_mllm_grpo
}


def two_steps(recipe: str, world, out: Path) -> list[str]:
    import yaml

    tiny = REPO / "configs" / recipe / "tiny.yaml"
    model = yaml.safe_load(tiny.read_text())["model"]
    overrides = [f"model={RANDOM_TWIN.get(model, model)}", f"output_dir={out}", "report_to=none", "train.max_steps=2",
                 "train.eval_steps=2", "train.save_steps=2", "train.logging_steps=1", "train.pairs_per_batch=2",
                 "train.seed=0", "train.warmup_steps=0", *(f"data.{s}={world.root / s}" for s in ("train", "val", "test"))]
    if recipe.startswith("mllm"):
        overrides += ["test_modes=[greedy,prefix]", "lora.vision=none", "lora.projector=none", "lora.anchor_weight=0"]
    if recipe == "mllm_grpo":
        overrides += ["grpo.num_generations=2"]  # 8 rollouts per image instead of 2 only cost time here
    return [str(tiny), *overrides]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_writes_one_run_shape_with_golden_losses(recipe, world, tmp_path):
    config, *overrides = two_steps(recipe, world, tmp_path / "run")
    results = run_recipe(recipe, config, overrides)
    run = tmp_path / "run"
    for name in ("config.yaml", "leakage.json", "val_history.jsonl", "results.json", "checkpoints/best/config.yaml",
                 "checkpoints/best/step.txt", "checkpoints/checkpoint-2/config.yaml",
                 *(f"{stage}/{f}" for stage in ("base", "test") for f in ("predictions.jsonl", "results.json", "report.md"))):
        assert (run / name).is_file(), name
    assert read_run_results(run) == results and results.kind == "run" and results.recipe == recipe
    for mode in results.other_modes:  # every other test mode in <stage>-<mode>/
        assert read_scored(run / f"base-{mode}")["mode"] == read_scored(run / f"test-{mode}")["mode"] == mode
    assert read_scored(run / "test")["mode"] == results.mode and results.final == read_scored(run / "test")
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses == pytest.approx(GOLDEN_LOSSES[recipe], rel=2e-3, abs=1e-6)
    # compare reads the run and its base through the run format, and agrees with the run's own scores
    summary = run_compare([run], run / "base", tmp_path / "compare")
    assert summary["rows"][1]["results"]["set_accuracy"] == results.final["set_accuracy"]
    assert summary["rows"][0]["results"]["set_accuracy"] == results.base["set_accuracy"]


@pytest.mark.slow  # fast lane under 2 min; cv's own tests cover the folds
def test_cv_directory_has_the_run_shape(world, tmp_path, capsys):
    out = tmp_path / "cv"
    config, *overrides = two_steps("clip_hardneg", world, tmp_path / "unused")
    overrides = [o for o in overrides if not o.startswith(("output_dir=", "data."))]
    assert main(["cv", "clip_hardneg", "--config", config, "--folds", "2", "--benchmark", str(world.root / "test"),
                 "--output-dir", str(out), *overrides]) == 0
    for name in ("config.yaml", "leakage.json", "val_history.jsonl", "results.json",
                 *(f"{stage}/{f}" for stage in ("base", "test") for f in ("predictions.jsonl", "results.json", "report.md"))):
        assert (out / name).is_file(), name
    cv = read_run_results(out)
    assert cv.kind == "cv" and cv.details["folds"] == 2 and cv.final["n_pairs"] == 8
    assert {json.loads(line)["fold"] for line in (out / "val_history.jsonl").read_text().splitlines()} == {0, 1}
    summary = run_compare([out], out / "base", tmp_path / "compare")
    assert summary["rows"][1]["strategy"] == "hardneg+replay (cv 2 folds)"


@pytest.mark.parametrize("twin", ["tiny-qwen2.5-vl", *(pytest.param(t, marks=pytest.mark.slow)  # fast lane: one twin
                                                        for t in ("tiny-gemma3", "tiny-llava-next", "tiny-llava-med"))])  # tiny-llava's classes
@pytest.mark.parametrize("recipe", ["mllm_sft", "mllm_dpo"])
def test_mllm_recipes_train_every_twin(recipe, twin, world, tmp_path):
    """Two steps of sft and dpo + image contrast on the newer architectures: LoRA placed, the loss moves."""
    config, *overrides = two_steps(recipe, world, tmp_path / "run")
    overrides = [f"model={twin}" if o.startswith("model=") else o for o in overrides]
    if twin == "tiny-gemma3":  # its projector is a raw weight: train it in full (lora would be refused)
        overrides = [o for o in overrides if not o.startswith("lora.projector")] + ["lora.projector=full"]
    results = run_recipe(recipe, config, overrides + ["train.learning_rate=0.01"])
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert results.steps == 2 and len(losses) == 2 and losses[0] != losses[1]
    if recipe == "mllm_dpo":
        assert [h["image_contrast"] for h in state["log_history"] if "image_contrast" in h]  # the term ran
