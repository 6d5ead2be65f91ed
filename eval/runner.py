"""``unconfuse eval``: ask a model every question of a benchmark, write predictions, score them.

Predictions are appended per batch (flushed and synced), so an interrupted run resumes from the
pairs already written. Batches are fixed chunks of the pair list, so a resumed run computes the
same batches as an uninterrupted one and its results are equal.

Under ``accelerate launch`` (``unconfuse eval --launch``) every process answers whole chunks of that
same chunking (``assign_chunks``) into a file of its own (``parts/``); the main process then gathers
them into one ``predictions.jsonl`` in a one-process run's order and scores it once.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .benchmarks import load_benchmark
from .evaluation import answer_questions
from .folders import owned_folder
from .images import ImageProblem, check_images
from .io import atomic_write_bytes, atomic_write_json
from .launch import LaunchState, launch_state
from .pairs import Benchmark, Pair
from .prompts import DEFAULT_PROMPTS, MODES, load_prompts
from .scorer import PARSERS, read_predictions, score_predictions
from .stopping import Stopped, deferred, signal_name, stop_requested
from .strategies import (STRATEGIES, Strategy, StrategyError, apply_strategy, check_strategy, parse_strategy,
                         strategy_from_record)

DEFAULT_BATCH_PAIRS = 8
PARTS = "parts"  # out/parts/predictions.rank-<r>.jsonl: a launched process's answers until they are gathered


class EvalInputError(ValueError):
    """Bad input found before any model is loaded (exit code 2)."""

    def __init__(self, message: str, problems: list[ImageProblem] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass
class EvalConfig:
    """Settings of ``unconfuse eval``; the command line's options are made from these fields."""

    model: str = field(metadata={"help": "preset name (configs/models), local folder or hub id"})
    mode: str = field(metadata={"help": "how the model answers: mc, greedy, prefix, freeform (MLLMs) or clip (encoders)",
                                "choices": MODES})
    benchmark: str = field(metadata={"help": "mediconfusion, a folder, a file, or hf:<dataset id>"})
    out: str = field(metadata={"help": "output folder; rerun with the same folder to resume"})
    batch_size: int | None = field(default=None, metadata={"help": "pairs per batch (default: preset's, else 8)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N pairs"})
    prompts: str = field(default=DEFAULT_PROMPTS, metadata={"help": "prompt set version or YAML path"})
    parser: str = field(default="strict", metadata={
        "help": "how mc answers are read: strict (default) or reference (to reproduce the paper)",
        "choices": tuple(sorted(PARSERS))})
    judge_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible endpoint for freeform mode (key from UNCONFUSE_JUDGE_API_KEY or OPENAI_API_KEY)"})
    judge_model: str | None = field(default=None, metadata={"help": "judge model name for freeform mode"})
    judge_temperature: float = field(default=0.0, metadata={
        "help": "judge sampling temperature (reference used 0.7)"})
    judge_margin: float = field(default=3, metadata={"help": "freeform: judge score margin an option needs to win "
                                                             "(the reference's --tr)"})
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu (default: cuda when available)"})
    trust_remote_code: bool | None = field(default=None, metadata={
        "help": "allow model code from the hub (off by default)"})
    split: str | None = field(default=None, metadata={"help": "split of a Hugging Face dataset benchmark"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr; --quiet turns them off"})
    force: bool = field(default=False, metadata={
        "help": "start afresh in an --out that holds another evaluation (its contents are moved aside, not deleted)"})
    strategy: str = field(default="plain", metadata={
        "help": "training-free strategy: plain, vcd (visual contrastive decoding), describe (describe, then answer), "
                "retrieve (similar corpus images with captions before the question)", "choices": tuple(STRATEGIES)})
    strategy_option: list[str] = field(default_factory=list, metadata={
        "help": "a strategy's option, key=value (repeatable): vcd alpha, cutoff, noise_step, seed; describe "
                "max_new_tokens; retrieve corpus, k, encoder", "action": "extend", "metavar": "KEY=VALUE"})
    retention: str | None = field(default=None, metadata={
        "help": "retention set (world:<split>, a JSONL, a folder, hf:<id>): general ability under the strategy "
                "against the same model without it, in results.json's retention"})
    retention_mode: str = field(default="prefix", metadata={
        "help": "how an MLLM answers the retention questions, as the recipes' data.retention_mode: prefix (each "
                "option scored as the reply) or greedy (the option's letter); encoders: zero-shot and retrieval",
        "choices": ("prefix", "greedy")})


def _chunks(pairs: list[Pair], size: int) -> Iterator[list[Pair]]:
    for start in range(0, len(pairs), size):
        yield pairs[start:start + size]


def read_done(path: Path) -> set[tuple[str, int]]:
    """Questions already answered in a predictions file; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    done = set()
    for line in data[:keep].decode("utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            done.add((str(rec["pair_id"]), int(rec["image"])))
    return done


def _run_meta(cfg: EvalConfig, bench: Benchmark, prompt_version: str) -> dict[str, Any]:
    where = Path(cfg.benchmark)
    meta = {"model": cfg.model, "mode": cfg.mode, "benchmark": bench.name, "n_pairs": len(bench.pairs),
            "benchmark_path": str(where.resolve()) if where.exists() else cfg.benchmark,
            "prompt_version": prompt_version, "judge_model": cfg.judge_model, "judge_margin": cfg.judge_margin}
    strategy = eval_strategy(cfg)
    if not strategy.plain:  # absent for plain scoring: folders written before strategies keep their fingerprint
        meta["strategy"] = strategy.record()
    if cfg.retention:
        meta.update(retention=cfg.retention, retention_mode=cfg.retention_mode)
    return meta


def eval_strategy(cfg: EvalConfig) -> Strategy:
    """The strategy ``cfg`` names, its options checked (EvalInputError naming a bad one)."""
    try:
        return parse_strategy(cfg.strategy, cfg.strategy_option)
    except StrategyError as exc:
        raise EvalInputError(str(exc)) from None


def check_inputs(cfg: EvalConfig):
    """Everything that can fail on bad input, before any model loads: benchmark, images, mode, strategy (a
    retrieve corpus audited against the benchmark's and the retention set's images), retention set."""
    from .models import resolve_model
    from .pairs import BenchmarkError
    from .retention import load_retention

    if cfg.mode not in MODES:
        raise EvalInputError(f"unknown mode {cfg.mode!r}; modes: {', '.join(MODES)}")
    for option, value in (("--limit", cfg.limit), ("--batch-size", cfg.batch_size)):
        if value is not None and value < 1:  # 0 must not read as "all pairs" or "the default batch"
            raise EvalInputError(f"{option} must be at least 1, got {value}")
    bench = load_benchmark(cfg.benchmark, split=cfg.split).limit(cfg.limit)
    problems = check_images(bench)
    if problems:
        raise EvalInputError(f"{len(problems)} image(s) missing or unreadable in {cfg.benchmark}", problems)
    spec = resolve_model(cfg.model)
    if (cfg.mode == "clip") != spec.is_encoder:
        need = "a CLIP-style encoder" if cfg.mode == "clip" else "an image-text-to-text model"
        raise EvalInputError(f"mode {cfg.mode!r} needs {need}; {cfg.model!r} is {spec.family}")
    if cfg.mode == "freeform" and not (cfg.judge_url and cfg.judge_model):
        raise EvalInputError("mode freeform needs --judge-url and --judge-model (an OpenAI-compatible endpoint)")
    try:
        rset = load_retention(cfg.retention) if cfg.retention else None
    except BenchmarkError as exc:
        raise EvalInputError(f"--retention: {exc}") from None
    try:
        check_strategy(eval_strategy(cfg), cfg.mode, spec.is_encoder, bench, rset)
    except StrategyError as exc:
        raise EvalInputError(str(exc)) from None
    return bench, spec


def run_eval(cfg: EvalConfig, launch: LaunchState | None = None, checked: tuple | None = None) -> dict[str, Any] | None:
    """Run (or resume) an evaluation; returns the results written to ``out/results.json`` (None in the
    processes of a launch other than the main one, which scores). ``launch``: this process's place in
    a launch (default: ``launch_state()``); ``checked``: what ``check_inputs(cfg)`` returned, when the caller
    has checked already (a retrieve corpus is audited once)."""
    from .models import model_identity

    launch = launch or launch_state()
    bench, spec = checked or check_inputs(cfg)
    prompts = load_prompts(cfg.prompts)
    out = Path(cfg.out)
    meta = _run_meta(cfg, bench, prompts.version)
    with contextlib.ExitStack() as owned:
        if launch.is_main:  # owned for the whole run: a second writer is refused, other inputs are refused
            # (or moved aside with --force); the other processes of a launch start once it is owned
            fingerprint = {"command": "eval", "settings": {k: v for k, v in meta.items() if k != "benchmark_path"},
                           "model": model_identity(spec), "data": bench.fingerprint()}  # the parser only rescores
            owned.enter_context(owned_folder(out, fingerprint, force=cfg.force, what="evaluation"))
            atomic_write_json(out / "run.json", meta)  # what `unconfuse score` reads: model, mode, prompt version
        return _answer_and_score(cfg, out, bench, spec, prompts, meta, launch)


def _answer_and_score(cfg: EvalConfig, out: Path, bench: Benchmark, spec, prompts, meta: dict[str, Any],
                      launch: LaunchState) -> dict[str, Any] | None:
    from tqdm import tqdm

    from .models import load_model

    pred_path = out / "predictions.jsonl"
    if launch.is_main:
        gather_predictions(out, bench)  # what the processes of a killed launch wrote counts as done
        done = read_done(pred_path)
    launch.wait()  # nothing is written to predictions.jsonl from here until every process is done
    if not launch.is_main:
        done = read_done(pred_path)
    batch_pairs = cfg.batch_size or spec.batch_size or DEFAULT_BATCH_PAIRS
    todo = [chunk for chunk in _chunks(bench.pairs, batch_pairs)
            if any((p.id, s) not in done for p in chunk for s in (1, 2))]
    todo = [todo[i] for i in assign_chunks(bench, todo, launch.processes)[launch.rank]]
    if launch.processes > 1:
        print(f"process {launch.rank} of {launch.processes}: {sum(len(c) for c in todo)} pairs to answer "
              f"({len(todo)} batches)", file=sys.stderr)
    loaded: list = []

    def model():
        """(plain backend, backend under the strategy, spec), loaded on first use."""
        if not loaded:
            if not cfg.progress:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            plain, loaded_spec = load_model(spec, device=cfg.device or launch.device, trust_remote_code=cfg.trust_remote_code)
            loaded.extend([plain, apply_strategy(plain, eval_strategy(cfg), cfg.device or launch.device), loaded_spec])
        return loaded

    if todo:
        _, backend, spec = model()
        judge = None
        if cfg.mode == "freeform":
            from .judge import Judge

            judge = Judge(cfg.judge_url, cfg.judge_model, prompts, temperature=cfg.judge_temperature)
        bar = tqdm(total=sum(len(c) for c in todo), unit="pair", desc=f"{spec.name} {cfg.mode}",
                   disable=not (cfg.progress and launch.is_main))
        target = pred_path if launch.processes == 1 else part_path(out, launch.rank)
        target.parent.mkdir(exist_ok=True)
        answered = 0
        with open(target, "a", encoding="utf-8") as fh, deferred():
            for chunk in todo:
                records = answer_pairs(backend, spec, cfg, prompts, bench, chunk, judge)
                # a chunk torn by a kill is recomputed whole: write only the questions not on disk yet
                fresh = [r for r in records if (str(r["pair_id"]), int(r["image"])) not in done]
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh))
                fh.flush()
                os.fsync(fh.fileno())
                bar.update(len(chunk))
                answered += len(chunk)
                if stop_requested():  # the batch is on disk: stop here, a rerun answers the rest
                    raise Stopped(stop_requested(), f"stopped by {signal_name(stop_requested())} after "
                                  f"{answered} of {sum(len(c) for c in todo)} pairs; the answers are in {target}; "
                                  f"rerun the same command to resume")
        bar.close()
    launch.wait()  # every process's answers are on disk
    if not launch.is_main:
        return None
    gather_predictions(out, bench)
    retention = measure_retention(cfg, out, model) if cfg.retention else None
    return score_run(out, bench, parser=cfg.parser, meta=meta, retention=retention)


def measure_retention(cfg: EvalConfig, out: Path, model) -> dict[str, Any]:
    """``results.json``'s retention block of an evaluation: the retention set answered by the model without the
    strategy (before) and under it (after; for plain scoring the same answers), in ``cfg.retention_mode`` (encoders:
    zero-shot and retrieval). Records are kept in ``out/retention/`` and reused when an evaluation resumes."""
    from .retention import answer_retention, load_retention, read_records, retention_block, write_records

    rset = load_retention(cfg.retention)
    mode = "clip" if cfg.mode == "clip" else cfg.retention_mode
    records = {}
    for stage in ("before", "after"):
        path = out / "retention" / f"{stage}.jsonl"
        if stage == "after" and eval_strategy(cfg).plain:
            records[stage] = records["before"]
        elif path.exists():
            records[stage] = read_records(path)
        else:
            plain, strategic, spec = model()
            records[stage] = answer_retention(plain if stage == "before" else strategic, spec, rset, mode,
                                              load_prompts(cfg.prompts))
            write_records(path, records[stage])
    block = retention_block(rset, mode, records["before"], records["after"])
    block["against"] = "the same model without the strategy"
    return block


def assign_chunks(bench: Benchmark, chunks: list[list[Pair]], processes: int) -> list[list[int]]:
    """Which of ``chunks`` (the batches of a one-process run) each of ``processes`` answers, as
    ascending chunk indices per process.

    Chunks are never cut, so each batch, and the prefix sharing within it, is the one-process run's.
    Chunks linked by a shared image form a group that one process takes whole (every image is encoded
    by one process, as in a one-process run), largest group first, to the least loaded process. No
    process takes more than ceil(chunks / processes): a group bigger than the room left (MediConfusion
    at 8 pairs per batch is one group) is cut, in breadth-first order of its image links so that
    chunks sharing an image stay together where they can; an image on a cut is encoded by two processes.
    """
    if processes == 1:
        return [list(range(len(chunks)))]
    from .splits import image_key

    chunks_of_image: dict[str, list[int]] = {}
    for i, chunk in enumerate(chunks):
        for pair in chunk:
            for ref in (pair.image_1, pair.image_2):
                holders = chunks_of_image.setdefault(image_key(bench, ref), [])
                if not holders or holders[-1] != i:
                    holders.append(i)
    linked: list[set[int]] = [set() for _ in chunks]
    for holders in chunks_of_image.values():
        for i in holders:
            linked[i].update(holders)
    seen = [False] * len(chunks)
    groups = []  # each in breadth-first order from its first chunk
    for first in range(len(chunks)):
        if seen[first]:
            continue
        seen[first] = True
        group = [first]
        for i in group:  # grows while it is walked
            for j in sorted(linked[i]):
                if not seen[j]:
                    seen[j] = True
                    group.append(j)
        groups.append(group)
    room = -(-len(chunks) // processes)
    assigned: list[list[int]] = [[] for _ in range(processes)]
    for group in sorted(groups, key=lambda g: (-len(g), g[0])):
        while group:
            least = min(range(processes), key=lambda r: (len(assigned[r]), r))
            take = room - len(assigned[least])  # > 0: the chunks left fit in the room left
            assigned[least] += group[:take]
            group = group[take:]
    return [sorted(a) for a in assigned]


def part_path(out: Path, rank: int) -> Path:
    """Where process ``rank`` of a launch appends its answers."""
    return out / PARTS / f"predictions.rank-{rank}.jsonl"


def gather_predictions(out: Path, bench: Benchmark) -> None:
    """Fold the launched processes' files (``out/parts/``) into ``out/predictions.jsonl``: each question
    once, in the order a one-process run writes (pair by pair, image 1 then 2; others after, as found),
    written atomically before the parts are removed. Lines are kept byte for byte; a line torn by a kill
    is dropped. A file already in that order, with no parts beside it, is left untouched."""
    pred_path = out / "predictions.jsonl"
    parts = sorted((out / PARTS).glob("predictions.rank-*.jsonl"), key=lambda p: int(p.stem.rpartition("-")[2]))
    lines: dict[tuple[str, int], bytes] = {}
    for path in (pred_path, *parts):
        if not path.exists():
            continue
        data = path.read_bytes()
        for line in data[:data.rfind(b"\n") + 1].splitlines(keepends=True):
            if line.strip():
                rec = json.loads(line)
                lines.setdefault((str(rec["pair_id"]), int(rec["image"])), line)
    position = {key: i for i, key in enumerate((p.id, side) for p in bench.pairs for side in (1, 2))}
    order = sorted(lines, key=lambda key: position.get(key, len(position)))  # stable: others keep their order
    if not parts and order == list(lines):
        return
    atomic_write_bytes(pred_path, b"".join(lines[key] for key in order))
    for part in parts:
        part.unlink()
    with contextlib.suppress(OSError):
        (out / PARTS).rmdir()


def score_run(out: Path, bench: Benchmark, parser: str, meta: dict[str, Any] | None = None,
              predictions_path: Path | None = None, retention: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score ``predictions_path`` (default ``out/predictions.jsonl``) on ``bench`` and make ``out`` a
    scored folder (predictions copied in when they came from elsewhere). A strategy named in ``meta`` is recorded
    (``strategy``: its label, compare's name for it; ``strategy_settings``; ``seed``), as is ``retention``."""
    from .runs import write_scored

    meta = meta or {}
    own = out / "predictions.jsonl"
    source = Path(predictions_path or own)
    copy = source.resolve() != own.resolve()
    # predictions from elsewhere must be of this benchmark; a run's own may hold pairs past a --limit
    predictions = read_predictions(source, pair_ids={p.id for p in bench.pairs} if copy else None)
    results = score_predictions(bench.pairs, predictions, parser, prompt_version=meta.get("prompt_version"))
    extra: dict[str, Any] = {}
    if meta.get("strategy"):
        strategy = strategy_from_record(meta["strategy"])
        extra.update(strategy=strategy.label(), strategy_settings=meta["strategy"], seed=strategy.seed)
    if retention is not None:
        extra["retention"] = retention
    return write_scored(out, results, records=list(predictions.values()) if copy else None, **extra,
                        model=meta.get("model") or "predictions", mode=meta.get("mode") or "unknown",
                        benchmark=meta.get("benchmark_path") or meta.get("benchmark") or bench.name,
                        benchmark_fingerprint=bench.fingerprint(),
                        title=f"MediConfusion scores: {meta.get('model') or source}")


def answer_pairs(backend, spec, cfg: EvalConfig, prompts, bench: Benchmark, pairs: list[Pair], judge=None) -> list[dict[str, Any]]:
    """One prediction record per question of ``pairs`` (both images of each pair), as ``cfg`` asks
    (``unconfuse.eval.evaluation.answer_questions``)."""
    return answer_questions(backend, spec, cfg.mode, prompts, bench, pairs, parser=cfg.parser, judge=judge,
                            judge_margin=cfg.judge_margin)
