"""The main job, as `make demo` runs it."""
import json

from unconfuse.eval.pairs import load_benchmark
from unconfuse.eval.scorer import read_predictions, resolve_answers, score
from unconfuse.eval.world import default_world
from unconfuse.train.cli import main
from unconfuse.train.demo import DEMO_RUNS


def test_demo_builds_the_world_and_prints_the_base_models_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    bench = load_benchmark(default_world().root / "test")
    for model, mode in DEMO_RUNS:
        run = tmp_path / f"{model}-{mode}"
        results = json.loads((run / "results.json").read_text())
        answers = resolve_answers(bench.pairs, read_predictions(run / "predictions.jsonl"), "strict")
        assert results["set_accuracy"] == score(bench.pairs, answers)["set_accuracy"]
        row = next(line for line in printed.splitlines() if line.startswith(f"{model} / {mode} "))
        assert f"{results['set_accuracy']:5.1f}" in row and f"{results['confusion']:5.1f}" in row
    assert f"test pairs: {len(bench.pairs)}" in printed


def test_data_sample_command(tmp_path, capsys):
    assert main(["data", "sample", "--out", str(tmp_path / "s")]) == 0
    assert len(load_benchmark(tmp_path / "s").pairs) == 6
