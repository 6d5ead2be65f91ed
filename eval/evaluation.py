"""Scoring in memory: a model's answers to a benchmark's pairs and their MediConfusion scores, without a run
folder (``unconfuse eval`` writes, resumes and gathers them on disk through ``unconfuse.eval.runner``; the
training recipes' validation loop and a notebook call these)::

    from unconfuse.eval import evaluate, load_benchmark, load_model

    model = load_model("tiny-llava")
    result = evaluate(model, load_benchmark("world:test"), mode="greedy")
    result.scores["set_accuracy"], result.scores["ci"]["set_accuracy"]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .benchmarks import load_benchmark
from .models.base import build_queries
from .pairs import Benchmark, Pair
from .prompts import DEFAULT_PROMPTS, MODES, PromptSet, load_prompts
from .scorer import PARSERS, choose_letter, resolve_answers, score_predictions
from .scorer import compare as compare_answers
from .stats import BOOTSTRAP_SAMPLES

MC_MAX_NEW_TOKENS = 32  # the reference's setting for mc mode


def score_dtype(backend) -> str | None:
    """The dtype the backend's model computes in (``bfloat16``, ``float32``): what sets an answer's noise band."""
    model = getattr(backend, "model", None)
    param = next(model.parameters(), None) if model is not None else None
    return str(param.dtype).removeprefix("torch.") if param is not None else None


def _queries(bench: Benchmark, pairs: list[Pair], render) -> list:
    """Both images of every pair as queries, with the prompt ``render(pair)``."""
    return build_queries((bench.resolve_image(pair.image(side)), render(pair), pair.options,
                          {"pair_id": pair.id, "image": side}) for pair in pairs for side in (1, 2))


def answer_questions(backend, spec, mode: str, prompts, bench: Benchmark, pairs: list[Pair], parser: str = "strict",
                     judge=None, judge_margin: float = 3.0) -> list[dict[str, Any]]:
    """One prediction record per question of ``pairs`` (both images of each pair) in scoring mode ``mode``:
    ``answer`` and ``scores`` (with ``margin`` and ``dtype``) for the scored modes, ``raw`` and ``parsed`` by
    ``parser`` for mc; freeform asks ``judge``, an option winning by ``judge_margin``. A backend answering under a
    training-free strategy (``unconfuse.eval.strategies``) adds what it saw per question as ``strategy``."""
    key = spec.prompt_key
    if mode == "clip":
        template = prompts.template("clip", spec.clip_prompt)
        queries = _queries(bench, pairs, lambda p: p.question)
        texts = [tuple(template.format(question=q.prompt, option=o) for o in q.options) for q in queries]
        scores = backend.similarities(queries, texts)
    elif mode == "greedy":
        queries = _queries(bench, pairs, lambda p: prompts.render("greedy", p.question, p.options, key))
        scores = backend.next_token_scores(queries, ("A", "B"))
    elif mode == "prefix":
        queries = _queries(bench, pairs, lambda p: prompts.render("prefix", p.question, p.options, key))
        scores = backend.continuation_scores(queries, [q.options for q in queries])
    elif mode in ("mc", "freeform"):
        queries = _queries(bench, pairs, lambda p: prompts.render(mode, p.question, p.options, key))
        texts = backend.generate(queries, MC_MAX_NEW_TOKENS if mode == "mc" else spec.max_new_tokens)
    else:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")

    records = []
    notes = getattr(backend, "last_notes", None) or [{}] * len(queries)
    dtype = score_dtype(backend) if mode in ("clip", "greedy", "prefix") else None
    for i, q in enumerate(queries):
        rec: dict[str, Any] = {"pair_id": q.meta["pair_id"], "image": q.meta["image"]}
        if mode in ("clip", "greedy", "prefix"):
            a, b = scores[i]
            # a NaN (or no finite) score is no answer (invalid), never B; the scores stay in the record
            choice = choose_letter([a, b], first_wins_ties=mode == "greedy")  # clip: B on ties, as prefix
            letter = None if choice is None else "AB"[choice]
            rec.update(answer=letter, raw=letter, scores={"A": a, "B": b})
            if letter is not None:  # how far from flipping, in the dtype the model scored in (scorer.near_ties)
                rec.update(margin=a - b, dtype=dtype)
        elif mode == "mc":
            rec.update(raw=texts[i], parsed=PARSERS[parser](texts[i], q.options), parser=parser)
        else:
            from .judge import decide, parse_judge_scores

            pair = next(p for p in pairs if p.id == q.meta["pair_id"])
            verdict = judge.ask(pair.question, pair.options, texts[i])
            judged = parse_judge_scores(verdict)
            rec.update(answer=decide(judged, judge_margin), raw=texts[i], judge={"scores": judged, "reply": verdict})
        if notes[i]:
            rec["strategy"] = notes[i]
        records.append(rec)
    return records


def predict(backend, spec, mode: str, bench: Benchmark, prompts, batch_pairs: int = 16, parser: str = "strict"):
    """Prediction records for every pair of ``bench`` (the same code path as ``unconfuse eval``).

    Under a multi-process launch each process scores its contiguous share of the pairs and every
    process gets all records back in pair order (accelerate's gather_object): N processes score each
    pair once, not N times."""
    def answer(share):
        records = []
        for start in range(0, len(share), batch_pairs):
            records += answer_questions(backend, spec, mode, prompts, bench, share[start:start + batch_pairs], parser)
        return records

    return shared_between_processes(bench.pairs, answer)


def shared_between_processes(items: list, answer: Callable[[list], list]) -> list:
    """``answer(items)`` with each process answering its contiguous share and every process getting all the
    results back in order (one process: a plain call)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return answer(items)
    with state.split_between_processes(items) as share:
        return gather_object(answer(share))


def by_question(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Prediction records keyed as the scorer reads them: (pair id, image 1 or 2)."""
    return {(r["pair_id"], r["image"]): r for r in records}


def score_records(bench: Benchmark, records: list[dict[str, Any]], parser: str = "strict", prompt_version=None,
                  bootstrap_samples: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """The MediConfusion scores (``unconfuse.eval.scorer.score``) of prediction records of ``bench``'s pairs."""
    return score_predictions(bench.pairs, by_question(records), parser, prompt_version=prompt_version,
                             bootstrap_samples=bootstrap_samples)


@dataclass
class Evaluation:
    """A model's answers to a benchmark (``records``: one per image, as ``predictions.jsonl`` holds them) and
    their scores (``scores``: set accuracy, confusion, ... with bootstrap intervals, as ``results.json``)."""

    records: list[dict[str, Any]]
    scores: dict[str, Any]
    benchmark: Benchmark
    parser: str = "strict"

    def answers(self) -> dict[tuple[str, int], str | None]:
        """(pair id, image 1 or 2) -> the answer ``A``, ``B`` or None (invalid), as the scorer read it."""
        return resolve_answers(self.benchmark.pairs, by_question(self.records), self.parser)


def evaluate(model, benchmark: Benchmark | str, mode: str = "greedy", *, prompts: PromptSet | str | None = None,
             batch_pairs: int = 8, parser: str = "strict", limit: int | None = None, strategy=None) -> Evaluation:
    """Score ``model`` (what ``load_model`` returns: ``(backend, spec)``) on ``benchmark`` (a Benchmark, or any
    benchmark argument: ``mediconfusion``, a folder, a file, ``hf:<id>``, ``world:<split>``) in ``mode``
    (mc, greedy, prefix for image-text-to-text models; clip for encoders), in memory. ``limit``: the first N pairs.
    ``strategy``: a training-free strategy (``unconfuse.eval.strategies.parse_strategy("vcd", ["alpha=1"])``)."""
    from .strategies import apply_strategy, check_strategy

    backend, spec = model
    bench = load_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    bench = bench.limit(limit)
    if (mode == "clip") != spec.is_encoder:
        raise ValueError(f"mode {mode!r} does not fit {spec.name} ({spec.family}); "
                         f"{'clip' if spec.is_encoder else 'mc, greedy or prefix'}")
    if strategy is not None:
        check_strategy(strategy, mode, spec.is_encoder, bench)
        backend = apply_strategy(backend, strategy)
    prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts or DEFAULT_PROMPTS)
    records = predict(backend, spec, mode, bench, prompt_set, batch_pairs, parser)
    return Evaluation(records, score_records(bench, records, parser, prompt_version=prompt_set.version), bench, parser)


def compare(baseline: Evaluation, other: Evaluation) -> dict[str, Any]:
    """``other`` against ``baseline`` on the same pairs: set accuracies, their difference with a paired bootstrap
    95% interval, the confusion difference, and the exact McNemar test on per-pair set correctness
    (``unconfuse.eval.scorer.compare``; ``unconfuse compare`` does the same for run folders)."""
    if baseline.benchmark.fingerprint() != other.benchmark.fingerprint():
        raise ValueError(f"compare: {baseline.benchmark.name} and {other.benchmark.name} are not the same pairs")
    return compare_answers(baseline.benchmark.pairs, baseline.answers(), other.answers())
