"""What a cluster does to a run: SIGTERM (preemption, requeue, a time limit's --signal) and Ctrl-C stop a run at
its next clean point with a saved checkpoint and one line; rerunning the same command resumes it and ends like
an uninterrupted run; a finished run's rerun does nothing. Real subprocesses, real signals."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .interrupt import assert_same_answers

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(world_of):
    return world_of(42)


def train_command(world, out: Path, *launch: str, steps: int = 24) -> list[str]:
    return [sys.executable, "-m", "unconfuse.cli", "train", "clip_hardneg", *launch, "--output-dir", str(out),
            "model=tiny-clip", f"data.train={world.root / 'train'}", f"data.val={world.root / 'val'}",
            f"data.test={world.root / 'test'}", "data.replay=auto", f"train.max_steps={steps}", "train.pairs_per_batch=4",
            "train.learning_rate=1e-3", "train.warmup_steps=0", "train.eval_steps=8", "train.save_steps=100",
            "train.logging_steps=1", "report_to=none"]


def signalled(command: list[str], signum: int, after: str) -> subprocess.CompletedProcess:
    """Run ``command``; send ``signum`` once a line of its output matches ``after``; its end."""
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(after, line):
            process.send_signal(signum)
            break
    rest, _ = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines) + rest, "")


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def last_loss(run_dir: Path, step: int) -> float:
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h][-1]


STOPPED = r"stopped by SIGTERM at step (\d+); checkpoint-\1 saved in (.+); rerun the same command to resume"


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_rerun_ends_like_an_uninterrupted_run(world, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(train_command(world, full)).returncode == 0

    stopped = signalled(train_command(world, part), signal.SIGTERM, after=r"step\s+3/24")
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert "Traceback" not in stopped.stdout
    message = re.search(STOPPED, stopped.stdout.strip().splitlines()[-1])
    assert message, stopped.stdout[-2000:]
    step = int(message.group(1))
    assert 3 <= step < 24 and (part / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (part / "results.json").exists()
    first = json.loads((part / "attempts.json").read_text())
    assert first["attempts"] == 1 and first["time_s"] > 0

    resumed = run(train_command(world, part))  # the same command: resumes by default
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {part / 'checkpoints' / f'checkpoint-{step}'}" in resumed.stdout
    results, want = (json.loads((d / "results.json").read_text()) for d in (part, full))
    assert results["steps"] == 24 and results["attempts"] == 2 and results["wall_time_s"] > first["time_s"]
    assert results["final"]["set_accuracy"] == want["final"]["set_accuracy"] and results["best_step"] == want["best_step"]
    assert last_loss(part, 24) == pytest.approx(last_loss(full, 24), rel=1e-5)
    assert_same_answers(part / "test" / "predictions.jsonl", full / "test" / "predictions.jsonl")

    # a finished run rerun: nothing trained or scored, its summary printed, nothing rewritten
    before = (part / "results.json").read_bytes()
    again = run(train_command(world, part))
    assert again.returncode == 0 and "finished before (24 steps, 2 attempt(s)); nothing to do" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == 24
    assert (part / "results.json").read_bytes() == before
    assert not (part / "checkpoints" / "checkpoint-25").exists()

    # killed while it scored the test (results.json never written): the rerun scores, and trains no step more
    (part / "results.json").unlink()
    rescored = run(train_command(world, part))
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    assert "training finished (24 steps); scoring what is missing" in rescored.stdout
    assert json.loads((part / "results.json").read_text())["steps"] == 24 and not (part / "checkpoints" / "checkpoint-25").exists()


@pytest.mark.slow
def test_sigterm_to_a_launched_run_stops_every_process_at_one_step(world, tmp_path):
    """``--launch`` (two DDP processes on the CPU): the signal to `unconfuse train` reaches both workers, which save
    the same step together and exit; nothing is left running; the rerun under the same launch finishes."""
    import psutil

    out = tmp_path / "ddp"
    launch = ("--launch", str(REPO / "configs" / "accelerate" / "ddp.yaml"))
    stopped = signalled(train_command(world, out, *launch, steps=40), signal.SIGTERM, after=r"step\s+3/40")
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    message = re.search(STOPPED, stopped.stdout)
    assert message, stopped.stdout[-3000:]
    step = int(message.group(1))
    assert (out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
    resumed = run(train_command(world, out, *launch, steps=40))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40 and results["attempts"] == 2


SIGINT_DURING_EVAL = """
import os, signal, sys
from unconfuse.eval import runner
from unconfuse.cli.eval import main

real, calls = runner.answer_pairs, []

def answer_pairs(*args, **kwargs):  # Ctrl-C while the second batch is answered
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

runner.answer_pairs = answer_pairs
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_during_eval_keeps_the_batch_and_the_rerun_completes(world, tmp_path):
    args = ["eval", "--model", "tiny-clip", "--mode", "clip", "--benchmark", str(world.root / "test"), "--batch-size", "4",
            "--quiet"]
    stopped = subprocess.run([sys.executable, "-c", SIGINT_DURING_EVAL, *args, "--out", str(tmp_path / "part")], cwd=REPO,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"stopped by SIGINT after 8 of \d+ pairs; the answers are in .*predictions\.jsonl; "
                        r"rerun the same command to resume", line), line
    assert len((tmp_path / "part" / "predictions.jsonl").read_text().splitlines()) == 16  # two batches of 4 pairs
    assert not (tmp_path / "part" / "results.json").exists()
    for out in ("part", "full"):
        done = run([sys.executable, "-m", "unconfuse.cli.eval", *args, "--out", str(tmp_path / out)])
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_answers(tmp_path / "part" / "predictions.jsonl", tmp_path / "full" / "predictions.jsonl")


@pytest.mark.slow
def test_a_preempted_study_task_requeues_and_collect_equals_the_uninterrupted_study(tmp_path):
    """configs/slurm/array.sbatch with a stand-in scontrol: SIGTERM to the batch script (what --signal=B:TERM sends
    ahead of the time limit) mid-fold reaches the run, which saves and exits 143; the script requeues its task;
    the requeued task resumes; `study collect` then equals the study whose tasks ran uninterrupted."""
    from unconfuse.cli.commands import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    studies = {}
    for name in ("plain", "preempted"):
        study = {"benchmark": "world:test", "folds": 2, "seeds": [0], "out": str(tmp_path / name),
                 "overrides": ["model=tiny-clip", "report_to=none", "train.max_steps=24", "train.eval_steps=8",
                               "train.save_steps=100", "train.logging_steps=1", "train.pairs_per_batch=4"],
                 "strategies": [{"name": "hardneg", "recipe": "clip_hardneg", "config": str(REPO / "configs/clip_hardneg/tiny.yaml")}]}
        studies[name] = tmp_path / f"{name}.yaml"
        studies[name].write_text(json.dumps(study))
        plan = subprocess.run([sys.executable, "-m", "unconfuse.cli", "study", "plan", str(studies[name])],
                              cwd=REPO, env=ENV, capture_output=True, text=True, check=True).stdout
        (tmp_path / f"{name}.txt").write_text(plan)

    def task(name: str, index: int) -> list[str]:
        return ["bash", str(REPO / "configs/slurm/array.sbatch"), str(tmp_path / f"{name}.txt")]

    def env(index: int) -> dict[str, str]:
        return {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_ARRAY_TASK_ID": str(index),
                "SLURM_ARRAY_JOB_ID": "4242"}

    for index in (0, 1):
        assert subprocess.run(task("plain", index), cwd=REPO, env=env(index), capture_output=True, text=True).returncode == 0

    process = subprocess.Popen(task("preempted", 0), cwd=REPO, env=env(0), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(r"step\s+3/24", line):
            process.send_signal(signal.SIGTERM)  # to the batch script only, as --signal=B:TERM does
            break
    output = "".join(lines) + process.communicate(timeout=600)[0]
    assert process.returncode == 143, output[-3000:]
    assert re.search(STOPPED, output) and "requeueing 4242_0 to resume" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242_0"]
    for index in (0, 1):  # the requeued task, then the other one
        done = subprocess.run(task("preempted", index), cwd=REPO, env=env(index), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in studies:
        assert main(["study", "collect", str(studies[name])]) == 0
    plain, preempted = (json.loads((tmp_path / name / "hardneg" / "seed-0" / "results.json").read_text())
                        for name in ("plain", "preempted"))
    assert preempted["final"] == plain["final"] and preempted["base"] == plain["base"]
    assert json.loads((tmp_path / "preempted" / "hardneg" / "seed-0" / "fold-0" / "results.json").read_text())["attempts"] == 2
