"""The main job, as `make demo` runs it (act 2 shortened to 20 steps per recipe)."""
import csv
import json

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.world import default_world


@pytest.mark.slow
def test_demo_trains_and_shows_a_real_gain(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["demo", "--out", str(tmp_path), "--mllm-steps", "20"]) == 0
    compared = {name: {r["strategy"]: r for r in csv.DictReader((tmp_path / name / "comparison.csv").open()) if r["row"] == "run"}
                for name in ("compare-encoder", "compare-mllm")}
    test = load_benchmark(default_world().root / "test")
    replay = json.loads((tmp_path / "clip_hardneg" / "results.json").read_text())
    old = json.loads((tmp_path / "clip_hardneg-old" / "results.json").read_text())
    wise = json.loads((tmp_path / "clip_hardneg-old-wise" / "results.json").read_text())
    assert replay["base"]["set_accuracy"] == old["base"]["set_accuracy"] == wise["base"]["set_accuracy"]  # same base and pairs
    assert replay["final"]["n_pairs"] == len(test.pairs) and replay["details"]["replay"]["per_batch"] == 32
    assert old["details"]["replay"]["per_batch"] == 0 and wise["details"]["interpolation"]["selection"] == "set_accuracy_with_retention_floor"
    # the improvement is real: the paired CI of the set-accuracy gain excludes zero
    low = float(compared["compare-encoder"]["hardneg+replay"]["set_accuracy_diff_ci_low"])
    assert low > 0 and replay["final"]["set_accuracy"] > replay["base"]["set_accuracy"]
    assert replay["final"]["confusion"] < replay["base"]["confusion"]
    # and it keeps what the base knew far better than the old recipe
    kept = {name: run["retention"]["metrics"]["accuracy"]["diff"] for name, run in (("replay", replay), ("old", old))}
    assert kept["replay"] > kept["old"] + 20 and kept["replay"] > -5, kept
    report = (tmp_path / "report.md").read_text()
    assert "| clip_hardneg (replay) |" in report and "McNemar" in report and (tmp_path / "validation.png").stat().st_size > 10_000
    assert "clip_hardneg-old-wise/pareto.png" in report and (tmp_path / "clip_hardneg-old-wise" / "pareto.png").stat().st_size > 10_000
    assert f"| clip_hardneg (replay) | {replay['final']['set_accuracy']:.1f} [" in report
    # act 2: the MLLM recipes ran on the same test pairs, from the same base; grpo started from the shipped sft
    sft_old = json.loads((tmp_path / "mllm_sft-old" / "results.json").read_text())
    sft = json.loads((tmp_path / "mllm_sft" / "results.json").read_text())
    grpo = json.loads((tmp_path / "mllm_grpo" / "results.json").read_text())
    base_greedy = json.loads((tmp_path / "tiny-llava-base-greedy" / "results.json").read_text())
    assert sft["steps"] == sft_old["steps"] == grpo["steps"] == 20
    assert sft["base"]["set_accuracy"] == sft_old["base"]["set_accuracy"] == grpo["base"]["set_accuracy"] == base_greedy["set_accuracy"]
    sft_best = [json.loads(l) for l in (tmp_path / "mllm_sft" / "val_history.jsonl").read_text().splitlines()]
    grpo_start = json.loads((tmp_path / "mllm_grpo" / "val_history.jsonl").read_text().splitlines()[0])
    assert grpo_start["set_accuracy"] == max(h["set_accuracy"] for h in sft_best)  # grpo starts where sft's selection ended
    assert "## Act 2" in report and "| mllm_sft (old: lr 1e-3) |" in report and "| mllm_grpo (after sft) |" in report
    # every run reports what it cost: retention on the world's held-out questions, before and after
    for run in (replay, old, wise, sft_old, sft, grpo):
        numbers = run["retention"]["metrics"][run["retention"]["headline"]]
        assert run["retention"]["benchmark"] == "world:test" and numbers["n"] > 100
        assert numbers["diff"] == pytest.approx(numbers["after"] - numbers["before"])
    assert sft["retention"]["metrics"]["accuracy"]["before"] == grpo["retention"]["metrics"]["accuracy"]["before"]
    assert "retention before -> after" in report
    # the demo ends with a failure atlas per act, every test pair a card
    for act, runs in (("atlas-encoder", 3), ("atlas-mllm", 3)):
        atlas = json.loads((tmp_path / act / "atlas.json").read_text())
        assert atlas["n_pairs"] == len(test.pairs) and len(atlas["runs"]) == runs
        assert (tmp_path / act / "index.html").stat().st_size > 10_000
    assert "atlas-mllm/index.html" in report
    # the demo ends with `unconfuse compare`, whose rescoring agrees with each recipe's own test score
    for name, runs in (("compare-encoder", {"hardneg": old, "hardneg+replay": replay, "hardneg+wise-ft": wise}),
                       ("compare-mllm", {"sft-lr1e-3": sft_old, "sft": sft, "grpo": grpo})):
        for strategy, res in runs.items():
            assert float(compared[name][strategy]["set_accuracy"]) == round(res["final"]["set_accuracy"], 4)
            assert float(compared[name][strategy]["confusion"]) == round(res["final"]["confusion"], 4)


@pytest.mark.slow  # spawns the demo's two workers
def test_a_demo_job_with_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """The demo's run folder holding something else: the job that owns it fails with one line naming the folder;
    the other jobs are stopped."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "clip_hardneg").mkdir()
    (tmp_path / "clip_hardneg" / "notes.txt").write_text("not a run")
    assert main(["demo", "--out", str(tmp_path), "--mllm-steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: clip_hardneg (replay): ") and str(tmp_path / "clip_hardneg") in err[-1]
    assert "holds no unconfuse clip_hardneg run" in err[-1] and "Traceback" not in "\n".join(err)
    assert (tmp_path / "clip_hardneg" / "notes.txt").read_text() == "not a run"  # nothing it held is lost


def test_data_sample_command(tmp_path, capsys):
    assert main(["data", "sample", "--out", str(tmp_path / "s")]) == 0
    assert len(load_benchmark(tmp_path / "s").pairs) == 6
