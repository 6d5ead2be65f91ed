"""`unconfuse eval` end to end on real radiology images with the tiny presets."""
import json
import shutil

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval import runner
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.runner import EvalConfig, run_eval
from unconfuse.eval.scorer import read_predictions, resolve_answers, score

from .http_stub import StubServer

MODEL_MODES = [("tiny-llava", "greedy"), ("tiny-llava", "prefix"), ("tiny-llava", "mc"),
               ("tiny-qwen2-vl", "greedy"), ("tiny-qwen2-vl", "prefix"), ("tiny-qwen2-vl", "mc"),
               ("tiny-qwen2.5-vl", "prefix"), ("tiny-gemma3", "greedy"), ("tiny-gemma3", "prefix"), ("tiny-gemma3", "mc"),
               ("tiny-clip", "clip"), ("tiny-hf-clip", "clip")]


@pytest.mark.parametrize("model, mode", MODEL_MODES)
def test_every_mode_runs_and_scores_its_own_predictions(tmp_path, sample_bench, model, mode, capsys):
    out = tmp_path / "run"
    assert main(["eval", "--model", model, "--mode", mode, "--benchmark", str(sample_bench), "--out", str(out),
                 "--batch-size", "2", "--quiet"]) == 0
    assert "| **All** | 6 |" in capsys.readouterr().out
    preds = read_predictions(out / "predictions.jsonl")
    assert len(preds) == 12
    results = json.loads((out / "results.json").read_text())
    bench = load_benchmark(sample_bench)
    recomputed = score(bench.pairs, resolve_answers(bench.pairs, preds, "strict"), parser="strict")
    for key in ("set_accuracy", "individual_accuracy", "confusion", "invalid", "precision"):
        assert results[key] == recomputed[key]
    assert results["prompt_version"] == "mediconfusion-v1" and results["model"] == model and results["mode"] == mode
    for rec in preds.values():
        if mode in ("greedy", "prefix", "clip"):
            a, b = rec["scores"]["A"], rec["scores"]["B"]
            assert rec["answer"] == ("A" if (a >= b if mode == "greedy" else a > b) else "B")
        else:
            assert "answer" not in rec and isinstance(rec["raw"], str)


@pytest.mark.parametrize("model, mode", [("tiny-llava", "prefix"), ("tiny-clip", "clip"),  # fast lane: resume is model-agnostic
                                         pytest.param("tiny-qwen2-vl", "mc", marks=pytest.mark.slow)])
def test_interrupted_eval_resumes_to_the_same_results(tmp_path, sample_bench, model, mode, monkeypatch):
    full = tmp_path / "full"
    run_eval(EvalConfig(model=model, mode=mode, benchmark=str(sample_bench), out=str(full), batch_size=2, progress=False))
    expected = json.loads((full / "results.json").read_text())

    calls = {"n": 0}
    real = runner.answer_pairs

    def dies_after_two_batches(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(runner, "answer_pairs", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_eval(EvalConfig(model=model, mode=mode, benchmark=str(sample_bench), out=str(part), batch_size=2, progress=False))
    assert len((part / "predictions.jsonl").read_text().splitlines()) == 8
    with open(part / "predictions.jsonl", "a") as fh:  # and a line torn by the kill
        fh.write('{"pair_id": "s005", "ima')

    counted = {"pairs": 0}

    def counting(backend, spec, cfg, prompts, bench, pairs, judge=None):
        counted["pairs"] += len(pairs)
        return real(backend, spec, cfg, prompts, bench, pairs, judge)

    monkeypatch.setattr(runner, "answer_pairs", counting)
    run_eval(EvalConfig(model=model, mode=mode, benchmark=str(sample_bench), out=str(part), batch_size=2, progress=False))
    assert counted["pairs"] == 2  # only the last batch was left
    resumed = json.loads((part / "results.json").read_text())
    assert resumed == expected
    got, want = read_predictions(part / "predictions.jsonl"), read_predictions(full / "predictions.jsonl")
    assert got.keys() == want.keys()
    for key, rec in want.items():  # same answers; scores equal up to batching's float noise
        assert got[key].get("answer") == rec.get("answer") and got[key].get("raw") == rec.get("raw")
        if "scores" in rec:
            assert got[key]["scores"] == pytest.approx(rec["scores"], abs=1e-5)


def test_missing_and_unreadable_images_are_all_listed_before_any_model_loads(tmp_path, sample_bench, monkeypatch, capsys):
    bench = tmp_path / "bench"
    shutil.copytree(sample_bench, bench)
    (bench / "images" / "ct_head.dcm").unlink()
    (bench / "images" / "us_neck.png").write_bytes(b"garbage")

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("unconfuse.eval.models.load_model", no_model)
    code = main(["eval", "--model", "tiny-llava", "--mode", "greedy", "--benchmark", str(bench), "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 image(s) missing or unreadable" in err  # ct_head in s001 and s006, us_neck in s003
    assert "pair s001 image 1" in err and "pair s006 image 2" in err and "pair s003 image 2" in err
    assert str(bench / "images" / "ct_head.dcm") in err
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_bad_benchmark_rows_and_mode_mismatch_exit_2(tmp_path, sample_bench, capsys):
    bench = tmp_path / "bench"
    shutil.copytree(sample_bench, bench)
    lines = (bench / "pairs.jsonl").read_text().splitlines()
    (bench / "pairs.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")
    assert main(["eval", "--model", "tiny-llava", "--mode", "greedy", "--benchmark", str(bench), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert "duplicate pair id 's001'" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-clip", "--mode", "greedy", "--benchmark", str(sample_bench), "--out",
                 str(tmp_path / "o2"), "--quiet"]) == 2
    assert "needs an image-text-to-text model" in capsys.readouterr().err


def test_resuming_into_another_runs_folder_is_refused(tmp_path, sample_bench, capsys):
    out = tmp_path / "o"
    assert main(["eval", "--model", "tiny-clip", "--mode", "clip", "--benchmark", str(sample_bench), "--out", str(out),
                 "--quiet", "--limit", "2"]) == 0
    assert main(["eval", "--model", "tiny-hf-clip", "--mode", "clip", "--benchmark", str(sample_bench), "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds another evaluation (settings.model: \"tiny-clip\" then \"tiny-hf-clip\"" in err and "--force" in err


def test_freeform_mode_with_a_loopback_judge(tmp_path, sample_bench, monkeypatch):
    secret = "sk-test-do-not-log-123"
    monkeypatch.setenv("UNCONFUSE_JUDGE_API_KEY", secret)
    seen = []

    def judge(method, path, body, headers):
        request = json.loads(body)
        seen.append((path, headers.get("authorization"), request))
        question = request["messages"][1]["content"]
        # an honest stub: prefers A for odd-numbered pair questions, is undecided on one
        if "Does this image show the abdomen?" in question:
            reply = "A: 5\nB: 4\nYour explanation: unsure"
        elif "imaging modality" in question:
            reply = "A: 9\nB: 2\nYour explanation: close to A"
        else:
            reply = "A: 1\nB: 8\nYour explanation: close to B"
        return 200, json.dumps({"choices": [{"message": {"content": reply}}]}).encode(), {"Content-Type": "application/json"}

    with StubServer(judge) as server:
        out = tmp_path / "ff"
        results = run_eval(EvalConfig(model="tiny-llava", mode="freeform", benchmark=str(sample_bench), out=str(out),
                                      judge_url=server.url + "/v1", judge_model="stub-judge", progress=False))
    assert len(seen) == 12
    assert all(path == "/v1/chat/completions" and auth == f"Bearer {secret}" for path, auth, _ in seen)
    assert seen[0][2]["model"] == "stub-judge" and "[Answer A]" in seen[0][2]["messages"][1]["content"]
    preds = read_predictions(out / "predictions.jsonl")
    assert preds[("s006", 1)]["answer"] is None            # 5 vs 4 is below the margin tr=3
    assert preds[("s001", 1)]["answer"] == "A" and preds[("s003", 2)]["answer"] == "B"
    # s001: A, A (answers A, B) -> one right; s002: A, A (answers B, A) -> one right; s003-s005: B, B
    assert results["invalid"] == pytest.approx(100 * 2 / 12)
    for path in out.iterdir():
        assert secret not in path.read_text()


def test_rescoring_mc_output_with_the_reference_parser(tmp_path, sample_bench, capsys):
    out = tmp_path / "mc"
    assert main(["eval", "--model", "tiny-llava", "--mode", "mc", "--benchmark", str(sample_bench), "--out", str(out),
                 "--quiet"]) == 0
    preds = out / "predictions.jsonl"
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    # give the random model some parseable answers: the two parsers read them differently
    lines[0]["raw"], lines[1]["raw"], lines[2]["raw"] = "(A)", "B", "A, B"
    preds.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["score", "--benchmark", str(sample_bench), "--predictions", str(preds), "--out", str(tmp_path / "ref"),
                 "--parser", "reference"]) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert ref["parser"] == "reference" and ref["prompt_version"] == "mediconfusion-v1" and ref["model"] == "tiny-llava"
    assert ref["invalid"] == pytest.approx(100 * 10 / 12)  # "(A)" is invalid for the reference, "A, B" reads as B
    assert main(["score", "--benchmark", str(sample_bench), "--predictions", str(preds), "--out", str(tmp_path / "st")]) == 0
    strict = json.loads((tmp_path / "st" / "results.json").read_text())
    assert strict["invalid"] == pytest.approx(100 * 10 / 12)  # strict reads "(A)" but refuses the ambiguous "A, B"
    assert strict["set_accuracy"] == 100 / 6  # s001: "(A)" and "B" are both right under strict
    assert ref["set_accuracy"] == 0.0


def test_eval_options_come_from_the_config_fields(tmp_path, monkeypatch, capsys):
    import dataclasses

    from unconfuse.cli.commands import build_parser
    from unconfuse.eval.options import config_from_args

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each help text on one line
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for f in dataclasses.fields(EvalConfig):
        assert f.metadata["help"] in usage, f.name
        if f.name != "progress":  # progress is --quiet
            assert f"--{f.name.replace('_', '-')}" in usage, f.name
    assert "--quiet" in usage
    required = ["--model", "tiny-llava", "--mode", "greedy", "--benchmark", "b", "--out", str(tmp_path)]
    for bad in (["--batch-size", "many"], ["--mode", "sing"], ["--parser", "loose"], ["--judge-margin", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", *required, *bad])
        assert exit_.value.code == 2, bad
        assert f"argument {bad[0]}: invalid" in capsys.readouterr().err
    # defaults are the config's; flags map onto their fields
    args = build_parser().parse_args(["eval", *required])
    assert config_from_args(EvalConfig, args) == EvalConfig("tiny-llava", "greedy", "b", str(tmp_path))
    args = build_parser().parse_args(["eval", *required, "--batch-size", "3", "--quiet", "--trust-remote-code", "--judge-margin", "2"])
    cfg = config_from_args(EvalConfig, args)
    assert (cfg.batch_size, cfg.progress, cfg.trust_remote_code, cfg.judge_margin) == (3, False, True, 2.0)


def test_judge_requests_retry_transient_failures_only():
    from unconfuse.eval.judge import JudgeError, chat_completion

    answers = {"/flaky": [503], "/down": [500, 500], "/bad": [400]}

    def handler(method, path, body, headers):
        if answers[path]:
            return answers[path].pop(0), b"nope", {}
        return 200, json.dumps({"choices": [{"message": {"content": "A: 9\nB: 1"}}]}).encode(), {}

    with StubServer(handler) as server:
        assert chat_completion(server.url + "/flaky", {"model": "m"}, retries=1) == "A: 9\nB: 1"
        with pytest.raises(JudgeError, match=f"{server.url}/down answered HTTP 500"):
            chat_completion(server.url + "/down", {"model": "m"}, retries=1)  # two attempts, both 500
        with pytest.raises(JudgeError, match=f"{server.url}/bad answered HTTP 400: nope"):
            chat_completion(server.url + "/bad", {"model": "m"}, retries=3)  # a client error is not retried
        counts = {p: sum(1 for _, q, _ in server.requests if q == p) for p in answers}
    assert counts == {"/flaky": 2, "/down": 2, "/bad": 1}
