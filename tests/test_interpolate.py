"""`unconfuse interpolate`: alpha 0 and 1 reproduce the base's and the run's own test predictions exactly, every
alpha is chosen on the validation side only, and the output is a run folder compare reads."""
import json
from pathlib import Path

import pytest

from unconfuse.cli import interpolate as interp
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.evaluation import predict
from unconfuse.eval.prompts import load_prompts
from unconfuse.eval.retention import answer_encoder, answer_mllm, load_retention
from unconfuse.train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _train(recipe: str, world, out: Path, model: str, steps: int = 3):
    from unconfuse.recipes import recipe_module

    module = recipe_module(recipe)
    overrides = [f"output_dir={out}", "report_to=none", f"model={model}", f"data.train={world.root / 'train'}",
                 f"data.val={world.root / 'val'}", f"data.test={world.root / 'test'}", f"train.max_steps={steps}",
                 "train.pairs_per_batch=2", "train.warmup_steps=0", f"train.eval_steps={steps}",
                 f"train.save_steps={steps}", "train.learning_rate=1e-2", "train.selection=last"]
    if recipe != "clip_hardneg":
        overrides += ["val_mode=greedy", "test_modes=[greedy]", "lora.dropout=0"]
    return module.main(load_config(module.CONFIG_CLASS, None, overrides))


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("recipe, model, weights", [("clip_hardneg", "tiny-clip", interp.EncoderWeights),
                                                    ("mllm_sft", "tiny-llava", interp.AdapterWeights)])
def test_alpha_0_and_1_reproduce_the_base_and_the_run_exactly(recipe, model, weights, world, tmp_path):
    from unconfuse.recipes import recipe_module

    run = _train(recipe, world, tmp_path / "run", model)
    assert run.best_step == 3
    cfg = load_config(recipe_module(recipe).CONFIG_CLASS, tmp_path / "run" / "config.yaml")
    blend = weights(cfg, tmp_path / "run" / "checkpoints" / "best", "cpu")
    test = load_benchmark(str(world.root / "test"))
    retention = load_retention(str(world.root / "retention" / "test.jsonl"))

    def retain(rset):
        if recipe == "clip_hardneg":
            return answer_encoder(blend.backend, rset, load_prompts().template("clip", blend.spec.clip_prompt))
        return answer_mllm(blend.backend, rset, cfg.data.retention_mode, batch=2 * cfg.val_batch_pairs)

    def score(mode):
        return predict(blend.backend, blend.spec, mode, test, load_prompts(), cfg.val_batch_pairs), None

    sides = {alpha: interp.score_test_side(blend, alpha, retention, [run.mode], score, retain) for alpha in (0.0, 1.0, 0.5)}
    for alpha, stage in ((0.0, "base"), (1.0, "test")):
        kept, scored = sides[alpha]
        assert scored[run.mode][0] == _predictions(tmp_path / "run" / stage / "predictions.jsonl"), alpha
        assert kept == _predictions(tmp_path / "run" / "retention" / f"{stage}.jsonl"), alpha
    assert sides[0.5][1][run.mode][0] != sides[1.0][1][run.mode][0]  # the blend is another model: the check has teeth


def test_the_alpha_is_chosen_on_the_validation_side_and_the_test_scored_once(world, tmp_path, monkeypatch):
    _train("clip_hardneg", world, tmp_path / "run", "tiny-clip")
    scored = []
    real_predict = interp.predict

    def recording(backend, spec, mode, bench, prompts, batch):
        scored.append(Path(bench.name).name)
        return real_predict(backend, spec, mode, bench, prompts, batch)

    monkeypatch.setattr(interp, "predict", recording)
    out = interp.interpolate(tmp_path / "run", [0.0, 0.5, 1.0], tmp_path / "wise",
                             selection="set_accuracy_with_retention_floor", retention_floor=100.0)
    assert scored == ["val", "val", "val", "test"]  # every alpha on val, then the chosen one on test, once
    pareto = json.loads((out / "pareto.json").read_text())
    rows = pareto["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0] and pareto["chosen_alpha"] == interp.choose(
        rows, "set_accuracy_with_retention_floor", 100.0)["alpha"]
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "checkpoints" / "best" / "alpha.txt").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["strategy"] == "hardneg+wise-ft" and results["details"]["interpolation"]["chosen_alpha"] == pareto["chosen_alpha"]
    assert results["retention"]["metrics"]["accuracy"]["n"] > 0
    # a floor no alpha but the base meets: the base is chosen
    strict = [{**r, "retention": r["retention"] - (0 if r["alpha"] == 0 else 50)} for r in rows]
    assert interp.choose(strict, "set_accuracy_with_retention_floor", 1.0)["alpha"] == 0.0
    from unconfuse.eval.tools.compare import run_compare

    summary = run_compare([tmp_path / "run", out], tmp_path / "run" / "base", tmp_path / "compare")
    assert [row["strategy"] for row in summary["rows"]][1:] == ["hardneg", "hardneg+wise-ft"]


def test_alphas_are_checked_and_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    from unconfuse.cli.commands import main
    from unconfuse.train.config import ConfigError

    assert interp.parse_alphas("1,0.5") == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="between 0 and 1"):
        interp.parse_alphas("0,1.5")
    assert main(["interpolate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no results.json" in err
