"""Sharing a finished run: its model card (numbers equal the run's own) and `unconfuse push` against a loopback
stand-in of the Hub's HTTP API (the files that arrive, the repo, no token anywhere)."""
import base64
import json
import re
import shutil

import pytest
import yaml

from unconfuse.cli.commands import main
from unconfuse.eval.tools.hub import model_card
from unconfuse.recipes import mllm_sft
from unconfuse.recipes.mllm_sft import MllmSftConfig
from unconfuse.train.config import TrainSettings
from unconfuse.train.mllm import MllmData, MllmLora

from .http_stub import StubServer

TOKEN = "hf_test_token_never_written"


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "run"
    mllm_sft.main(MllmSftConfig(
        model="tiny-llava", output_dir=str(out), report_to="none", val_mode="greedy", test_modes=["greedy"],
        lora=MllmLora(dropout=0.0), data=MllmData(train=str(world.root / "train"), val=str(world.root / "val"),
                                                 test=str(world.root / "test")),
        train=TrainSettings(max_steps=2, pairs_per_batch=2, learning_rate=1e-3, warmup_steps=0, eval_steps=2,
                            save_steps=2, logging_steps=1, selection="last")))
    return out


def test_the_card_says_what_the_run_measured(run, tmp_path, capsys):
    assert main(["card", str(run), "--out", str(tmp_path / "README.md")]) == 0
    card = (tmp_path / "README.md").read_text()
    results = json.loads((run / "results.json").read_text())
    meta = yaml.safe_load(card.split("---")[1])
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["set_accuracy"] == round(results["final"]["set_accuracy"], 2)
    assert metrics["individual_accuracy"] == round(results["final"]["individual_accuracy"], 2)
    assert meta["library_name"] == "peft" and "mllm_sft" in meta["tags"] and "base_model" not in meta  # a local twin
    for stage in ("base", "final"):
        res = results[stage]
        assert f"{res['set_accuracy']:.1f} [{res['ci']['set_accuracy'][0]:.1f}, {res['ci']['set_accuracy'][1]:.1f}]" in card
    change = results["retention"]["metrics"]["accuracy"]
    assert f"{change['before']:.1f} -> {change['after']:.1f}, change {change['diff']:+.1f}" in card
    assert "McNemar's exact p = " in card and f"{results['steps']} steps" in card
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    assert fingerprint["data"]["train"] in card and "W&B: not logged" in card


def test_an_unfinished_run_is_refused_in_one_line(run, tmp_path, capsys):
    copy = tmp_path / "unfinished"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".unconfuse*"))
    (copy / "results.json").unlink()
    assert main(["card", str(copy)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {copy}: no results.json: the run has not finished (rerun its command to complete it)"
    with pytest.raises(Exception, match="never scored"):
        shutil.rmtree(run.parent / "untested", ignore_errors=True)
        untested = shutil.copytree(run, run.parent / "untested", ignore=shutil.ignore_patterns(".unconfuse*"))
        shutil.rmtree(untested / "test")
        model_card(untested)


def hub_stand_in():
    """The Hub's repo-create, branch, preupload and commit endpoints; every file committed, decoded."""
    state = {"created": [], "branches": [], "files": {}, "commits": []}

    def handler(method, path, body, headers):
        reply = lambda obj: (200, json.dumps(obj).encode(), {"Content-Type": "application/json"})  # noqa: E731
        if path == "/api/repos/create":
            request = json.loads(body)
            state["created"].append(request)
            return reply({"url": f"{server.url}/{request['organization']}/{request['name']}"})
        if path == "/api/validate-yaml":  # the Hub checks a README's metadata before the commit
            state["validated"] = json.loads(body)
            return reply({})
        if m := re.match(r"/api/models/(.+)/branch/(.+)$", path):
            state["branches"].append(m.group(2))
            return reply({})
        if m := re.match(r"/api/models/(.+)/preupload/(.+)$", path):
            files = json.loads(body)["files"]
            return reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if m := re.match(r"/api/models/(.+)/commit/(.+)$", path):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            state["commits"].append((m.group(1), m.group(2), lines[0]["value"]["summary"]))
            for line in lines[1:]:
                state["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return reply({"commitUrl": f"{server.url}/{m.group(1)}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return 404, b"{}", {"Content-Type": "application/json"}

    server = StubServer(handler)
    return server, state


@pytest.mark.parametrize("merged", [False, pytest.param(True, marks=pytest.mark.slow)])  # slow: merges into the base
def test_push_uploads_weights_card_and_evidence_without_the_token(run, monkeypatch, capsys, merged):
    import huggingface_hub.constants

    server, state = hub_stand_in()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        argv = ["push", str(run), "--repo-id", "me/tiny-unconfused", "--private", "--revision", "v1"]
        assert main(argv + (["--merged"] if merged else [])) == 0
    printed = capsys.readouterr()
    assert state["created"][0]["name"] == "tiny-unconfused" and state["created"][0]["organization"] == "me"
    assert state["created"][0].get("private") is True or state["created"][0].get("visibility") == "private"
    assert state["branches"] == ["v1"] and state["commits"][0][:2] == ("me/tiny-unconfused", "v1")
    files = state["files"]
    weights = {"model.safetensors", "config.json"} if merged else {"adapter_model.safetensors", "adapter_config.json"}
    assert weights <= set(files) and {"README.md", "unconfuse/results.json", "unconfuse/config.yaml"} <= set(files)
    assert files["unconfuse/results.json"] == (run / "results.json").read_bytes()
    assert files["README.md"].decode() == model_card(run, merged=merged)
    assert "model-index" in state["validated"]["content"]  # the card's metadata went through the Hub's check
    assert ("library_name: transformers" if merged else "library_name: peft") in files["README.md"].decode()
    everything = b"".join(files.values()) + (printed.out + printed.err).encode()
    assert TOKEN.encode() not in everything
    assert [h.get("authorization") for _, p, h in server.requests if p.endswith("/commit/v1")] == [f"Bearer {TOKEN}"]


def test_push_needs_the_token_from_the_environment(run, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["push", str(run), "--repo-id", "me/x"]) == 2
    assert capsys.readouterr().err.strip() == "error: HF_TOKEN is not set: push reads the token from the environment only"
