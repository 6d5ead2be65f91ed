"""The demo's job runner (cli/jobs.py): dependency order, the longest chain first, prefixed
output lines, failures named, and (slow) jobs side by side in spawned one-thread workers."""
import os
import time

import pytest

from tests import jobs_work
from unconfuse.cli.jobs import Job, JobFailed, run_jobs


def test_jobs_run_after_what_they_wait_on_longest_chain_first(tmp_path, capsys):
    log = str(tmp_path / "order.log")
    jobs = [Job("short", jobs_work.record, (log, "short"), cost=1),
            Job("long-tail", jobs_work.record, (log, "long-tail"), after=("head",), cost=10),
            Job("head", jobs_work.record, (log, "head"), cost=2),  # 2 + 10 waiting on it: starts first
            Job("last", jobs_work.record, (log, "last"), after=("short", "long-tail"), cost=1)]
    results = run_jobs(jobs, workers=1)
    assert results == {"head": "head", "long-tail": "long-tail", "short": "short", "last": "last"}
    assert open(log).read().split() == ["head", "long-tail", "short", "last"]
    out = capsys.readouterr().out
    assert "  head | ran head\n" in out and "] last: done in" in out


def test_a_failed_job_is_named_and_stops_the_rest(tmp_path):
    log = str(tmp_path / "order.log")
    jobs = [Job("broken", jobs_work.fail, ("no such file: x.jsonl",), cost=5),
            Job("after", jobs_work.record, (log, "after"), after=("broken",))]
    with pytest.raises(JobFailed, match=r"^broken: no such file: x.jsonl$"):
        run_jobs(jobs, workers=1)
    assert not os.path.exists(log)


@pytest.mark.parametrize("jobs, message", [
    ([Job("a", jobs_work.sleep, (0,), after=("b",)), Job("b", jobs_work.sleep, (0,), after=("a",))], "cycle: a, b"),
    ([Job("a", jobs_work.sleep, (0,), after=("nope",))], "unknown job(s): nope")])
def test_impossible_orders_are_refused(jobs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_jobs(jobs, workers=1)


@pytest.mark.slow  # spawns two workers that import torch (~10 s on 2 cores)
def test_two_workers_run_jobs_side_by_side_on_their_share_of_the_cores(tmp_path, capfd):
    folder = str(tmp_path)
    jobs = [Job("left", jobs_work.meet, (folder, "left", "right")),  # each returns only once the other runs
            Job("right", jobs_work.meet, (folder, "right", "left")),
            Job("then", jobs_work.record, (str(tmp_path / "log"), "then"), after=("left", "right"))]
    results = run_jobs(jobs, workers=2)
    assert results["left"]["pid"] != results["right"]["pid"] and os.getpid() not in (results["left"]["pid"], results["right"]["pid"])
    assert results["left"]["threads"] == results["right"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert results["then"] == "then"
    out = capfd.readouterr().out
    assert "  left | left met right\n" in out and "  right | partial line without newline\n" in out

    # a failing job stops the workers at once: the job still sleeping beside it is not waited for
    started = time.time()
    with pytest.raises(JobFailed, match="^broken: bad row 3$"):
        run_jobs([Job("sleeper", jobs_work.sleep, (60,)), Job("broken", jobs_work.fail, ("bad row 3",))], workers=2)
    assert time.time() - started < 40

    # a worker killed outright (no Python exception to send back) is reported, not waited on forever
    with pytest.raises(JobFailed, match="a worker process died while running them"):
        run_jobs([Job("sleeper", jobs_work.sleep, (60,)), Job("killed", jobs_work.die, ())], workers=2)
