"""Issue 12, bad numbers and one-line errors: non-finite training stops (exit 3) naming the step and the
last good checkpoint; NaN scores are invalid answers, never "B"; undefined metrics are null, printed n/a;
settings out of range, a local model path that does not exist and unreadable benchmark files are one-line
errors (exit 2) before any model loads."""
import json
import math
from pathlib import Path

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval import models
from unconfuse.eval.benchmarks import BenchmarkError, load_benchmark
from unconfuse.eval.models import ModelLoadError, resolve_model
from unconfuse.eval.pairs import Pair
from unconfuse.eval.scorer import compare, render_report, score, score_table
from unconfuse.train.callbacks import NonFiniteError, NonFiniteGuard

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


# ---------------------------------------------------------------------------------------------
# Non-finite training


def diverging(recipe: str, world, out: Path | None, learning_rate: str) -> list[str]:
    """A recipe's tiny config on a random tiny model with a learning rate it cannot survive, a checkpoint every step."""
    args = ["--config", str(REPO / "configs" / recipe / "tiny.yaml"), "report_to=none", "train.max_steps=4",
            f"train.learning_rate={learning_rate}", "train.save_steps=1", "train.eval_steps=100", "train.logging_steps=1",
            "train.pairs_per_batch=2", "train.warmup_steps=0", *(f"data.{s}={world.root / s}" for s in ("train", "val", "test"))]
    if recipe == "clip_hardneg":
        args.append("model=tiny-clip")
    else:
        args += ["model=tiny-llava", "test_modes=[greedy]", "lora.vision=none", "lora.projector=none", "lora.anchor_weight=0"]
    return [*args, f"output_dir={out}"] if out else args


def assert_stopped_at_step_2(run: Path, line: str, learning_rate: str) -> None:
    """Step 1 is finite, step 2 is not: checkpoint-1 is the last one, whole and finite; nothing was scored after."""
    from safetensors.torch import load_file

    last = run / "checkpoints" / "checkpoint-1"
    assert line == (f"error: non-finite loss at step 2 (train.learning_rate={float(learning_rate):g} too high?); "
                    f"last good checkpoint: {last}")
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]
    tensors = [t for f in last.glob("*.safetensors") for t in load_file(f).values()]
    assert tensors and all(t.isfinite().all() for t in tensors)
    assert not (run / "results.json").exists() and not (run / "test").exists()


@pytest.mark.parametrize("recipe, learning_rate", [  # tiny-llava's loss saturates (grad 0) at 1e9: it needs more
    ("clip_hardneg", "1e9"), pytest.param("mllm_sft", "1e30", marks=pytest.mark.slow)])
def test_non_finite_training_stops_with_exit_3_naming_the_step(recipe, learning_rate, world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", recipe, *diverging(recipe, world, run, learning_rate)]) == 3
    assert_stopped_at_step_2(run, one_error_line(capsys), learning_rate)


@pytest.mark.slow
def test_non_finite_training_under_accelerate_launch_still_exits_3(world, tmp_path, capsys):
    """accelerate launch reports any failing process as exit 1; unconfuse train --launch returns the recipe's own 3
    (2 real processes: both diverge at the same step)."""
    run = tmp_path / "run"
    launch = ["--launch", str(REPO / "configs" / "accelerate" / "ddp.yaml")]
    assert main(["train", "clip_hardneg", *launch, *diverging("clip_hardneg", world, run, "1e9")]) == 3
    assert (run / "checkpoints" / "checkpoint-1").is_dir() and not (run / "results.json").exists()


def test_non_finite_training_in_cv_stops_with_exit_3(world, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["cv", "clip_hardneg", "--folds", "2", "--benchmark", str(world.root / "test"), "--output-dir", str(out),
                 *[a for a in diverging("clip_hardneg", world, None, "1e9") if not a.startswith("data.")]]) == 3
    assert_stopped_at_step_2(out / "fold-0", one_error_line(capsys), "1e9")


def test_non_finite_gradient_stops_before_the_optimizer_step(tmp_path):
    import torch
    from transformers import TrainerControl, TrainerState

    for step, complete in ((3, True), (4, False)):  # checkpoint-4 was cut off mid-save: no trainer_state.json
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[1.0, INF], [0.0, 0.0]])
    args, state = type("Args", (), {"output_dir": str(tmp_path)})(), TrainerState(global_step=4)
    guard = NonFiniteGuard(lambda: torch.tensor(0.5), hint="train.learning_rate=1 too high?")
    with pytest.raises(NonFiniteError) as err:
        guard.on_pre_optimizer_step(args, state, TrainerControl(), model=model)
    assert str(err.value) == ("non-finite gradient at step 5 (train.learning_rate=1 too high?); "
                              f"last good checkpoint: {tmp_path / 'checkpoint-3'}")
    model.weight.grad = torch.zeros(2, 2)
    guard.on_pre_optimizer_step(args, state, TrainerControl(), model=model)  # finite: goes on
    with pytest.raises(NonFiniteError, match="^non-finite loss at step 5; no checkpoint was saved before it$"):
        NonFiniteGuard(lambda: torch.tensor(NAN)).on_pre_optimizer_step(
            type("Args", (), {"output_dir": str(tmp_path / "none")})(), state, TrainerControl(), model=model)


# ---------------------------------------------------------------------------------------------
# NaN scores, undefined metrics


class NanScores:
    """A backend whose scores for the first image of every pair are NaN or infinite."""

    def _scores(self, queries):
        bad = [(NAN, 0.0), (0.0, INF), (-INF, -INF), (NAN, NAN)]
        return [bad[i // 2 % len(bad)] if q.meta["image"] == 1 else (1.0, 0.0) for i, q in enumerate(queries)]

    def next_token_scores(self, queries, letters):
        return self._scores(queries)

    def continuation_scores(self, queries, options):
        return self._scores(queries)

    def similarities(self, queries, texts):
        return self._scores(queries)


@pytest.mark.parametrize("model, mode", [("tiny-llava", "greedy"), ("tiny-llava", "prefix"), ("tiny-clip", "clip")])
def test_nan_scores_are_invalid_answers_never_b(model, mode, sample_bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda spec, **kw: (NanScores(), spec))
    out = tmp_path / "eval"
    assert main(["eval", "--model", model, "--mode", mode, "--benchmark", str(sample_bench), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12
    for rec in records:
        if rec["image"] == 1:  # non-finite: no answer, the scores kept as they came
            assert rec["answer"] is None and rec["raw"] is None
            assert not all(math.isfinite(v) for v in rec["scores"].values())
        else:
            assert rec["answer"] == "A" and rec["scores"] == {"A": 1.0, "B": 0.0}
    results = json.loads((out / "results.json").read_text())
    assert results["invalid"] == 50.0 and results["valid_pairs"] == 0 and results["set_accuracy"] == 0.0
    assert results["confusion"] is None and results["precision"] is None and results["ci"]["confusion"] is None
    assert results["notes"][0] == "confusion and precision are undefined (null): no pair has two valid answers"
    report = capsys.readouterr().out
    assert "| **All** | 6 | 0.00 | 25.00 | n/a | 0 | 50.00 | n/a |" in report and "confusion [n/a]" in report


def pairs_and_answers(answers_1, answers_2):
    pairs = [Pair(str(k), f"{k}a", f"{k}b", "Q", "x", "y", "A", "B", ["Cardiac"], ["Spinal"]) for k in range(len(answers_1))]
    return pairs, {(p.id, s): a for p, a1, a2 in zip(pairs, answers_1, answers_2) for s, a in ((1, a1), (2, a2))}


def test_undefined_metrics_are_null_with_a_note_and_print_as_na():
    pairs, answers = pairs_and_answers(["A", None, "A"], [None, "B", None])  # no pair has two valid answers
    res = score(pairs, answers, bootstrap_samples=50)
    assert (res["confusion"], res["precision"], res["ci"]["confusion"]) == (None, None, None)
    assert res["set_accuracy"] == 0.0 and res["individual_accuracy"] == 50.0 and res["invalid"] == 50.0
    assert res["per_category"]["Cardiac"]["confusion"] is None and res["notes"] == [
        "confusion and precision are undefined (null): no pair has two valid answers"]
    assert json.loads(json.dumps(res))["confusion"] is None  # JSON null
    assert "| **All** | 3 | 0.00 | 50.00 | n/a | 0 | 50.00 | n/a |" in render_report(res)
    assert "n/a" in score_table([("m", res)])
    # every valid pair confused: confusion 100, precision undefined
    pairs, answers = pairs_and_answers(["A", "B"], ["A", "B"])
    res = score(pairs, answers, bootstrap_samples=50)
    assert res["confusion"] == 100.0 and res["precision"] is None
    assert res["notes"] == ["precision is undefined (null): every pair with two valid answers is confused"]
    # defined: no note, numbers as before
    pairs, answers = pairs_and_answers(["A", "A"], ["B", "A"])
    res = score(pairs, answers, bootstrap_samples=50)
    assert (res["confusion"], res["precision"], "notes" in res) == (50.0, 100.0, False)


def test_compare_prints_undefined_confusion_as_na(tmp_path, capsys):
    pairs, all_invalid = pairs_and_answers(["A", None, None, None], [None, None, "B", None])
    _, right = pairs_and_answers(["A"] * 4, ["B"] * 4)
    diff = compare(pairs, all_invalid, right, samples=50)
    assert diff["confusion_diff"] is None and diff["confusion_diff_ci"] is None and diff["set_accuracy_diff"] == 100.0
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": p.id, "image_1": p.image_1, "image_2": p.image_2, "question": "Q",
                                         "option_a": "x", "option_b": "y", "answer_1": "A", "answer_2": "B"}) + "\n"
                             for p in pairs))
    runs = {}
    for name, answers in (("invalid", all_invalid), ("right", right)):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "predictions.jsonl").write_text("".join(json.dumps({"pair_id": k[0], "image": k[1], "answer": a}) + "\n"
                                                             for k, a in answers.items()))
        assert main(["score", "--benchmark", str(bench), "--predictions", str(runs[name] / "predictions.jsonl"),
                     "--out", str(runs[name])]) == 0
    capsys.readouterr()
    assert main(["compare", str(runs["right"]), "--baseline", str(runs["invalid"]), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    baseline = next(line for line in printed.splitlines() if "[baseline]" in line)
    assert baseline.split()[-1] == "n/a"
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| 0.0 [0.0, 0.0] | n/a [n/a] |" in table


# ---------------------------------------------------------------------------------------------
# Settings out of range, model paths, benchmark files: one line, exit 2, before any model loads


@pytest.fixture()
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "_hub_config", refuse)  # nothing is sent to the hub either


@pytest.mark.parametrize("option, value", [("--limit", "0"), ("--limit", "-2"), ("--batch-size", "0"), ("--batch-size", "-1")])
def test_eval_limit_and_batch_size_below_1_are_errors(option, value, sample_bench, tmp_path, no_model_loads, capsys):
    assert main(["eval", "--model", "tiny-llava", "--mode", "greedy", "--benchmark", str(sample_bench),
                 "--out", str(tmp_path / "out"), option, value]) == 2
    assert one_error_line(capsys) == f"error: {option} must be at least 1, got {value}"
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


@pytest.mark.parametrize("key", ["max_steps", "eval_steps", "save_steps"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_train_steps_below_1_are_errors(key, value, no_model_loads, capsys):
    assert main(["train", "clip_hardneg", "--config", str(REPO / "configs" / "clip_hardneg" / "tiny.yaml"),
                 f"train.{key}={value}"]) == 2
    assert one_error_line(capsys).endswith(f"train.{key}: must be at least 1, got {value}")


@pytest.mark.parametrize("arg", ["./nope", "../nope", "/abs/nope", "~/nope", "a/b/nope", "./nope.yaml"])
def test_a_local_model_path_that_does_not_exist_is_never_a_hub_id(arg, no_model_loads):
    with pytest.raises(ModelLoadError, match=f"^model path {arg.replace('.', '[.]')} does not exist$"):
        resolve_model(arg)


def test_eval_with_a_model_path_that_does_not_exist(sample_bench, tmp_path, no_model_loads, capsys):
    assert main(["eval", "--model", "./nope", "--mode", "greedy", "--benchmark", str(sample_bench),
                 "--out", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys) == "error: model path ./nope does not exist"


def test_train_with_a_model_path_that_does_not_exist(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "_hub_config", lambda *a: pytest.fail("sent to the hub"))
    args = [a for a in diverging("mllm_sft", world, tmp_path / "run", "1e-3") if not a.startswith("model=")]
    assert main(["train", "mllm_sft", *args, "model=../x"]) == 2
    assert one_error_line(capsys) == "error: model path ../x does not exist"


GOOD = {"id": "p", "image_1": "a.png", "image_2": "b.png", "question": "Q", "option_a": "x", "option_b": "y",
        "answer_1": "A", "answer_2": "B"}


@pytest.mark.parametrize("name, content, message", [
    ("bench.jsonl", json.dumps(GOOD).encode() + b'\n{"id": "caf\xe9"}\n', "line 2: not UTF-8 text (byte 0xe9)"),
    ("bench.jsonl", json.dumps(GOOD).encode() + b"\n[1, 2]\n", "line 2: expected a JSON object"),
    ("bench.jsonl", b'"just a string"\n', "line 1: expected a JSON object"),
    ("dataset.json", b'{\n "1": {"question": "\xff"}\n}\n', "line 2: not UTF-8 text (byte 0xff)"),
    ("dataset.json", b'{\n "1": {"question": \n}\n', "line 3: not JSON (Expecting value)"),
    ("dataset.json", b"[1, 2]", "item 0: expected a JSON object, got int"),
    ("dataset.json", b'{"1": "text"}', "pair 1: expected a JSON object, got str"),
    ("dataset.json", b"42", "the top level (pair id -> pair object, or a list of pair objects): expected a JSON object, got int"),
    ("dataset.csv", b"id,question\n1,caf\xe9\n", "line 2: not UTF-8 text (byte 0xe9)"),
])
def test_unreadable_benchmark_files_are_one_line_errors_naming_file_and_line(name, content, message, tmp_path, capsys,
                                                                           no_model_loads):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BenchmarkError) as err:
        load_benchmark(str(path))
    assert str(err.value) == f"{path}: {message}"
    assert main(["eval", "--model", "tiny-llava", "--mode", "greedy", "--benchmark", str(path),
                 "--out", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys) == f"error: {path}: {message}"
