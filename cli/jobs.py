"""Dependent jobs on a few worker processes: the demo's base-model builds and runs side by side.

A tiny model trains faster as two one-thread processes than as one two-thread process (measured on this
2-core machine: one thread costs 1.33-1.37x the time of two, and two one-thread jobs at once run as fast as
one alone), so the demo gives each job one worker's share of the cores. Workers are spawned once (torch and
transformers are imported once per worker, not per job); each job's output lines carry its name, and the
ready job heading the longest chain of expected work starts first.
"""
from __future__ import annotations

import graphlib
import io
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Job:
    """``fn(*args)`` once every job named in ``after`` has finished. ``cost``: expected seconds (only for
    ordering); ``what``: what it does, for the progress line."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()
    cost: float = 1.0
    what: str = ""


class JobFailed(RuntimeError):
    """A job failed: the message names it; ``__cause__`` is the job's own exception (from a worker, with the
    worker's traceback as that exception's cause), or the broken pool when a worker process died."""


class _Prefixed(io.TextIOBase):
    """A text stream that writes whole lines to ``stream``, each led by ``prefix`` (two jobs' lines never mix)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.partial = stream, prefix, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text.replace("\r\n", "\n").replace("\r", "\n")).split("\n")
        for line in lines:
            if line.strip():
                self.stream.write(f"{self.prefix}{line}\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_line(self) -> None:
        if self.partial.strip():
            self.stream.write(f"{self.prefix}{self.partial}\n")
            self.stream.flush()
        self.partial = ""


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_job(name: str, fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    """Run one job with its output lines prefixed by its name; (its result, its seconds)."""
    started = time.time()
    out, err = _Prefixed(sys.stdout, f"  {name} | "), _Prefixed(sys.stderr, f"  {name} | ")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        return fn(*args), time.time() - started
    finally:
        out.close_line()
        err.close_line()
        sys.stdout, sys.stderr = saved


def _chains(jobs: list[Job]) -> dict[str, float]:
    """Each job's cost plus the costliest chain of jobs waiting on it."""
    waiting = {j.name: [k for k in jobs if j.name in k.after] for j in jobs}
    memo: dict[str, float] = {}

    def chain(job: Job) -> float:
        if job.name not in memo:
            memo[job.name] = job.cost + max((chain(k) for k in waiting[job.name]), default=0.0)
        return memo[job.name]

    return {j.name: chain(j) for j in jobs}


def run_jobs(jobs: list[Job], workers: int, start: float | None = None) -> dict[str, Any]:
    """Run ``jobs`` in dependency order on ``workers`` spawned processes (each on cores // workers
    threads), or one after another in this process when ``workers`` is 1. Returns {name: result}.
    A failed job stops the rest (their run directories are resumable) and raises ``JobFailed``."""
    names = {j.name for j in jobs}
    for job in jobs:
        unknown = [a for a in job.after if a not in names]
        if unknown:
            raise ValueError(f"job {job.name!r} waits on unknown job(s): {', '.join(unknown)}")
    try:
        graphlib.TopologicalSorter({j.name: j.after for j in jobs}).prepare()
    except graphlib.CycleError as exc:
        raise ValueError(f"jobs wait on each other in a cycle: {', '.join(sorted(set(exc.args[1])))}") from None
    start = time.time() if start is None else start
    chains = _chains(jobs)
    pending, results, running = list(jobs), {}, {}  # running: future -> job (workers > 1)

    def ready() -> list[Job]:
        return sorted((j for j in pending if all(a in results for a in j.after)), key=lambda j: -chains[j.name])

    def started(job: Job) -> None:
        pending.remove(job)
        print(f"[{time.time() - start:4.0f} s] {job.name}: {job.what or 'started'} ...", flush=True)

    def finished(job: Job, result: Any, seconds: float) -> None:
        results[job.name] = result
        print(f"[{time.time() - start:4.0f} s] {job.name}: done in {seconds:.0f} s", flush=True)

    if workers <= 1:
        while pending:
            job = ready()[0]
            started(job)
            try:
                finished(job, *_run_job(job.name, job.fn, job.args))
            except Exception as exc:
                raise JobFailed(f"{job.name}: {exc}") from exc
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"{len(jobs)} jobs on {workers} worker processes ({threads} thread{'s' * (threads > 1)} each)", flush=True)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(threads,))
    completed = False
    processes: dict[int, Any] = {}  # every worker started: a broken pool may have dropped its own list by the end
    try:
        while pending or running:
            for job in ready()[:max(0, workers - len(running))]:
                started(job)
                running[pool.submit(_run_job, job.name, job.fn, job.args)] = job
            processes.update(getattr(pool, "_processes", None) or {})
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            if not done and any(process.exitcode is not None for process in processes.values()):
                # a worker was killed and the pool has not noticed: CPython's manager thread can miss a worker spawned
                # after it started waiting, and then learns of the death only when another job ends (60 s in CI)
                names = ", ".join(job.name for job in running.values())
                raise JobFailed(f"{names}: a worker process died while running them (killed, or out of memory?)")
            for future in done:
                job = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as exc:  # every running job's future fails: which one died is unknown
                    names = ", ".join([job.name, *(j.name for j in running.values())])
                    raise JobFailed(f"{names}: a worker process died while running them (killed, or out of memory?)") from exc
                except Exception as exc:
                    raise JobFailed(f"{job.name}: {exc}") from exc
                finished(job, *result)
        completed = True
    finally:
        if not completed:  # a failed job or an interrupt: the jobs beside it stop now (their run folders resume)
            # no public way to stop running workers before Python 3.14's terminate_workers(); after a worker died the
            # pool may already have forgotten the others (then shutdown waited for a sleeping job to end: 60 s in CI)
            for process in {**processes, **(getattr(pool, "_processes", None) or {})}.values():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
    return results
