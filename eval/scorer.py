"""The MediConfusion scorer: a pure function of (pairs, per-image answers).

Definitions equal the reference implementation's (MShahabSepehri/MediConfusion,
``utils/answering.py``): set accuracy over pairs, individual accuracy over the 2N questions,
confusion among pairs whose two answers are both valid, invalid rate over questions, precision
(set-correct among valid, unconfused pairs). Per-category numbers use the image-side label counts
as denominators and count a pair once per label per side, exactly as the reference does.

No torch, no transformers: numpy for the bootstrap, scipy for the exact McNemar test.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping

import numpy as np

from .pairs import MEDICONFUSION_CATEGORIES, Pair
from .stats import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, mcnemar_exact, percent, percentile_interval, resamples

SCORER_VERSION = "1.1.0"  # 1.1: an undefined metric (zero denominator) is null with a note, not 0
HEADLINE = ("set_accuracy", "individual_accuracy", "confusion")

Answer = str | None  # "A", "B" or None (invalid)

# Score noise between two evaluations of one model (batch size, padding, kernels), by the dtype it scored in: an
# answer whose margin (score A - score B) is inside the band can flip with the batch size. The bands sit above the
# batched vs one-at-a-time differences measured on the twins (docs/evaluating.md, tests/test_near_ties.py).
NOISE_BANDS = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.1}


def choose_letter(scores: list[float], first_wins_ties: bool = True) -> int | None:
    """The index of the winning option of ``scores``, or None (no answer) when a score is NaN or +inf or none is
    above -inf. A -inf is probability 0 (an option the ``vcd`` strategy cuts as implausible): the others win. Ties go
    to the first option (greedy: the reference's argmax) or to the last (prefix: the reference's strict >)."""
    if any(math.isnan(s) or s == math.inf for s in scores) or all(s == -math.inf for s in scores):
        return None
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return winners[0] if first_wins_ties else winners[-1]


def near_ties(records: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """How many scored answers lie within the noise band of their dtype (``NOISE_BANDS``): ``count`` of
    ``scored`` answers with a margin, per dtype; None when no record has a margin (mc, freeform, old runs)."""
    per_dtype: dict[str, dict[str, Any]] = {}
    for rec in records:
        margin, dtype = rec.get("margin"), rec.get("dtype")
        if margin is None or dtype not in NOISE_BANDS:
            continue
        row = per_dtype.setdefault(dtype, {"band": NOISE_BANDS[dtype], "count": 0, "scored": 0})
        row["scored"] += 1
        row["count"] += abs(margin) < row["band"]
    if not per_dtype:
        return None
    return {"count": sum(r["count"] for r in per_dtype.values()), "scored": sum(r["scored"] for r in per_dtype.values()),
            "by_dtype": per_dtype}


# ---------------------------------------------------------------------------------------------
# Parsers: raw model output -> "A" / "B" / None


def parse_reference(raw: str | None, options: tuple[str, str] | None = None) -> Answer:
    """The reference parser, quirks included (published numbers were made with it).

    The output is split on single spaces (after newlines become spaces); a letter counts when one
    of these exact tokens occurs: ``X``, ``X:``, ``.X``, ``.X:``, ``X.``, ``X")``, ``("X":``,
    ``("X")``, ``("X").``. Both letters found, or none, is invalid. So ``(A)`` and ``a`` are
    invalid and ``A, B`` reads as B.
    """
    if raw is None:
        return None
    tokens = raw.replace("\n", " ").split(" ")
    found = []
    for letter in ("A", "B"):
        accepted = {letter, f"{letter}:", f".{letter}", f".{letter}:", f"{letter}.", f'{letter}")',
                    f"{letter}\n", f"\n{letter}", f'("{letter}":', f'("{letter}")', f'("{letter}").'}
        if any(token in accepted for token in tokens):
            found.append(letter)
    return found[0] if len(found) == 1 else None


_LETTER_ONLY = re.compile(r'^[\s"\'(\[{*#:_`]*([ABab])[\s"\')\]}*.:,;!_`]*$')
_LEADING_LETTER = re.compile(r'^[\s"\'(\[{*#_`]*([AB])(?:[\s"\')\]}*.:;!_`]|$)')
_ANSWER_IS = re.compile(r'\b(?:answer|option|choice)\s*(?:is|:|=|-)?\s*(?:option\s*)?[\s"\'(\[*]*([AB])\b', re.I)
_NOT_AFTER_ARTICLE = {"or", "and", "nor", "vs", "versus", "is", "was", "seems", "fits"}
_STANDALONE = re.compile(r'(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])')


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def parse_strict(raw: str | None, options: tuple[str, str] | None = None) -> Answer:
    """Our parser, for our own runs. In order, first rule that decides wins:

    1. the output is just a letter, upper or lower case, with brackets, quotes, markdown or
       punctuation around it: ``A``, ``(A)``, ``b.``, ``**B**``, ``A")``;
    2. it starts with a capital letter followed by a separator (not a comma, as in ``A, B``):
       ``A: pneumothorax``, ``B) ...``;
    3. an explicit statement: ``Answer: A``, ``The answer is (B)``, ``option A``; if statements
       name both letters, invalid;
    4. the text of exactly one option is echoed (case and punctuation ignored);
    5. exactly one of the letters stands alone somewhere (not ``A`` used as an article before a
       lower-case word); both letters, invalid.
    Anything else is invalid.
    """
    if raw is None:
        return None
    text = raw.strip()
    if not text:
        return None
    match = _LETTER_ONLY.match(text)
    if match:
        return match.group(1).upper()
    match = _LEADING_LETTER.match(text)
    if match and not re.match(r'^A\s+[a-z]', text):
        return match.group(1)  # "A small nodule" falls through: an article
    stated = {m.group(1).upper() for m in _ANSWER_IS.finditer(text)}
    if len(stated) == 1:
        return stated.pop()
    if len(stated) > 1:
        return None
    if options:
        norm = f" {_normalise(text)} "
        echoed = [letter for letter, option in zip("AB", options)
                  if _normalise(option) and f" {_normalise(option)} " in norm]
        if len(echoed) == 1:
            return echoed[0]
    letters = set()
    for m in _STANDALONE.finditer(text):
        following = re.match(r"\s+([a-z]+)", text[m.end():])
        if m.group(1) == "A" and following and following.group(1) not in _NOT_AFTER_ARTICLE:
            continue  # "A small nodule ..." is an article, not an answer
        letters.add(m.group(1))
    return letters.pop() if len(letters) == 1 else None


PARSERS: dict[str, Callable[[str | None, tuple[str, str] | None], Answer]] = {
    "reference": parse_reference,
    "strict": parse_strict,
}


# ---------------------------------------------------------------------------------------------
# Predictions files


class PredictionsError(ValueError):
    """A predictions file is malformed or does not cover the benchmark; names the line or pair."""


def read_predictions(path: str | Path, pair_ids: Collection[str] | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """``predictions.jsonl`` -> {(pair_id, image side): record}. A second line for one question is an
    error (which one counts would be a guess), and so is a pair id not in ``pair_ids`` when given."""
    path = Path(path)
    records: dict[tuple[str, int], dict[str, Any]] = {}
    first_line: dict[tuple[str, int], int] = {}
    from .io import json_lines

    with open(path, encoding="utf-8") as fh:
        for lineno, where, rec in json_lines(fh, path, PredictionsError):
            if not isinstance(rec, dict) or "pair_id" not in rec or rec.get("image") not in (1, 2):
                raise PredictionsError(f"{where}: needs pair_id and image (1 or 2)")
            if "answer" in rec and rec["answer"] not in ("A", "B", None):
                raise PredictionsError(f"{where}: answer must be \"A\", \"B\" or null, got {rec['answer']!r}")
            if "answer" not in rec and "raw" not in rec:
                raise PredictionsError(f"{where}: needs answer or raw")
            key = (str(rec["pair_id"]), int(rec["image"]))
            if key in first_line:
                raise PredictionsError(f"{where}: second prediction for pair {key[0]!r} image {key[1]} "
                                       f"(first on line {first_line[key]})")
            if pair_ids is not None and key[0] not in pair_ids:
                raise PredictionsError(f"{where}: pair id {key[0]!r} is not in the benchmark")
            first_line[key] = lineno
            records[key] = rec
    return records


def resolve_answers(pairs: list[Pair], predictions: Mapping[tuple[str, int], Mapping[str, Any]],
                    parser: str = "strict") -> dict[tuple[str, int], Answer]:
    """The answer of every question: ``answer`` when given, else ``raw`` through the parser.

    Every question of ``pairs`` must have a prediction; the error lists the missing ones.
    """
    parse = PARSERS[parser]
    missing = [f"{p.id}/{side}" for p in pairs for side in (1, 2) if (p.id, side) not in predictions]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise PredictionsError(f"{len(missing)} question(s) have no prediction (pair/image): {shown}")
    answers = {}
    for pair in pairs:
        for side in (1, 2):
            rec = predictions[(pair.id, side)]
            answers[(pair.id, side)] = rec["answer"] if "answer" in rec else parse(rec.get("raw"), pair.options)
    return answers


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Outcomes:
    """Per-pair boolean arrays, the only thing every metric is computed from."""

    correct_1: np.ndarray
    correct_2: np.ndarray
    valid_1: np.ndarray
    valid_2: np.ndarray
    same_answer: np.ndarray  # the two answers are equal (invalid == invalid counts, but see confused)

    @property
    def set_correct(self) -> np.ndarray:
        return self.correct_1 & self.correct_2

    @property
    def both_valid(self) -> np.ndarray:
        return self.valid_1 & self.valid_2

    @property
    def confused(self) -> np.ndarray:
        return self.both_valid & self.same_answer


def outcomes(pairs: list[Pair], answers: Mapping[tuple[str, int], Answer]) -> Outcomes:
    a1 = [answers[(p.id, 1)] for p in pairs]
    a2 = [answers[(p.id, 2)] for p in pairs]
    return Outcomes(
        correct_1=np.array([a == p.answer_1 for a, p in zip(a1, pairs)], dtype=bool),
        correct_2=np.array([a == p.answer_2 for a, p in zip(a2, pairs)], dtype=bool),
        valid_1=np.array([a is not None for a in a1], dtype=bool),
        valid_2=np.array([a is not None for a in a2], dtype=bool),
        same_answer=np.array([x == y for x, y in zip(a1, a2)], dtype=bool),
    )


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A metric for a table: ``n/a`` when it is undefined (None)."""
    return "n/a" if value is None else format(value, spec)


def fmt_ci(bounds: list[float] | None) -> str:
    """A CI as ``[lo, hi]``; ``[n/a]`` when undefined (None)."""
    return "[n/a]" if bounds is None else f"[{bounds[0]:.1f}, {bounds[1]:.1f}]"


def undefined_notes(results: Mapping[str, Any]) -> list[str]:
    """Why metrics of ``results`` are null: no pair with two valid answers, or none of them unconfused."""
    notes = []
    if results["confusion"] is None:
        notes.append("confusion and precision are undefined (null): no pair has two valid answers")
    elif results["precision"] is None:
        notes.append("precision is undefined (null): every pair with two valid answers is confused")
    cats = [c for c, row in results.get("per_category", {}).items() if row["precision"] is None]
    if cats and results["precision"] is not None:
        notes.append(f"per-category confusion or precision is undefined (null) in {', '.join(cats)}: "
                     "no pair with two valid answers, or none unconfused")
    return notes


def category_order(pairs: Iterable[Pair]) -> list[str]:
    """MediConfusion's categories in the reference order, then any others as first seen."""
    seen: dict[str, None] = {}
    for pair in pairs:
        for cat in pair.categories_1 + pair.categories_2:
            seen.setdefault(cat)
    known = [c for c in MEDICONFUSION_CATEGORIES if c in seen]
    return known + [c for c in seen if c not in MEDICONFUSION_CATEGORIES]


def score_predictions(pairs: list[Pair], predictions: Mapping[tuple[str, int], Mapping[str, Any]], parser: str,
                      **kwargs: Any) -> dict[str, Any]:
    """``score`` of prediction records (answers resolved with ``parser``), with ``near_ties`` where the records
    carry margins."""
    results = score(pairs, resolve_answers(pairs, predictions, parser), parser=parser, **kwargs)
    ties = near_ties(predictions.values())
    if ties is not None:
        results["near_ties"] = ties
    return results


def score(pairs: list[Pair], answers: Mapping[tuple[str, int], Answer], *, parser: str | None = None,
          prompt_version: str | None = None, bootstrap_samples: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """All metrics of one set of answers, as ``results.json`` holds them (percentages, 0-100)."""
    out = outcomes(pairs, answers)
    n = len(pairs)
    results: dict[str, Any] = {
        "set_accuracy": percent(out.set_correct.sum(), n),
        "individual_accuracy": percent(out.correct_1.sum() + out.correct_2.sum(), 2 * n),
        "confusion": percent(out.confused.sum(), out.both_valid.sum()),
        "invalid": percent((~out.valid_1).sum() + (~out.valid_2).sum(), 2 * n),
        "precision": percent(out.set_correct.sum(), (out.both_valid & ~out.confused).sum()),
        "n_pairs": n,
        "valid_pairs": int(out.both_valid.sum()),
        "per_category": {},
    }
    for cat in category_order(pairs):
        k1 = np.array([Counter(p.categories_1)[cat] for p in pairs], dtype=np.int64)
        k2 = np.array([Counter(p.categories_2)[cat] for p in pairs], dtype=np.int64)
        kb = k1 + k2
        total = int(kb.sum())  # image-side label count: the reference denominator
        valids = int((out.both_valid * kb).sum())
        unconfused = int(((out.both_valid & ~out.confused) * kb).sum())
        set_score = int((out.set_correct * kb).sum())
        results["per_category"][cat] = {
            "set_accuracy": percent(set_score, total),
            "individual_accuracy": percent((out.correct_1 * k1).sum() + (out.correct_2 * k2).sum(), total),
            "confusion": percent((out.confused * kb).sum(), valids),
            "invalid": percent((~out.valid_1 * k1).sum() + (~out.valid_2 * k2).sum(), total),
            "precision": percent(set_score, unconfused),
            "total": total,
            "valid_pairs": valids,
        }
    results["ci"] = bootstrap_ci(out, samples=bootstrap_samples)
    results["ci_level"] = 95
    notes = undefined_notes(results)
    if notes:
        results["notes"] = notes
    results["scorer_version"] = SCORER_VERSION
    results["parser"] = parser
    if prompt_version is not None:
        results["prompt_version"] = prompt_version
    return results


def _metric_samples(out: Outcomes, idx: np.ndarray) -> dict[str, np.ndarray]:
    set_c = out.set_correct[idx].mean(axis=1)
    indiv = (out.correct_1[idx].sum(axis=1) + out.correct_2[idx].sum(axis=1)) / (2 * idx.shape[1])
    valid = out.both_valid[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(valid > 0, out.confused[idx].sum(axis=1) / np.maximum(valid, 1), np.nan)
    return {"set_accuracy": 100 * set_c, "individual_accuracy": 100 * indiv, "confusion": 100 * conf}


def bootstrap_ci(out: Outcomes, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 95.0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals over pairs for the headline metrics (fixed seed)."""
    idx = resamples(len(out.correct_1), samples, seed)
    return {name: percentile_interval(values, level) for name, values in _metric_samples(out, idx).items()}


def compare(pairs: list[Pair], answers_a: Mapping[tuple[str, int], Answer], answers_b: Mapping[tuple[str, int], Answer],
            samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """B against A on the same pairs: paired bootstrap CI of the set-accuracy difference (B - A)
    and the exact McNemar test on per-pair set-correctness."""
    keys = {(p.id, s) for p in pairs for s in (1, 2)}
    for label, answers in (("A", answers_a), ("B", answers_b)):
        missing = keys - set(answers)
        if missing:
            raise PredictionsError(f"run {label} lacks {len(missing)} question(s) of these pairs, e.g. {sorted(missing)[:3]}")
    oa, ob = outcomes(pairs, answers_a), outcomes(pairs, answers_b)
    n = len(pairs)
    paired = paired_accuracy(oa.set_correct, ob.set_correct, samples, seed)
    idx = resamples(n, samples, seed)  # the same resamples as paired_accuracy's
    conf_a, conf_b = _metric_samples(oa, idx)["confusion"], _metric_samples(ob, idx)["confusion"]
    ca = percent(oa.confused.sum(), oa.both_valid.sum())
    cb = percent(ob.confused.sum(), ob.both_valid.sum())
    return {
        "n_pairs": n,
        "set_accuracy_a": paired["a"],
        "set_accuracy_b": paired["b"],
        "set_accuracy_diff": paired["diff"],
        "set_accuracy_diff_ci": paired["diff_ci"],
        "confusion_diff": None if ca is None or cb is None else cb - ca,
        "confusion_diff_ci": percentile_interval(conf_b - conf_a),
        "mcnemar_only_a": paired["mcnemar_only_a"],
        "mcnemar_only_b": paired["mcnemar_only_b"],
        "mcnemar_p": paired["mcnemar_p"],
    }


def paired_accuracy(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """B against A on the same items (per-item booleans): both accuracies (percent), the difference B - A with
    its paired percentile-bootstrap 95% interval, and the exact McNemar test on the discordant items."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    n = len(a)
    idx = resamples(n, samples, seed)
    diff_samples = 100.0 * (b[idx].astype(float) - a[idx].astype(float)).mean(axis=1)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    acc_a, acc_b = percent(a.sum(), n), percent(b.sum(), n)
    return {"a": acc_a, "b": acc_b, "diff": acc_b - acc_a, "diff_ci": percentile_interval(diff_samples),
            "mcnemar_only_a": only_a, "mcnemar_only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


# ---------------------------------------------------------------------------------------------
# Report


def render_report(results: Mapping[str, Any], title: str = "MediConfusion scores") -> str:
    """The reference table's columns (plus the CI) as Markdown."""
    lines = [f"# {title}", ""]
    meta = [f"scorer {results.get('scorer_version')}", f"parser {results.get('parser')}"]
    if results.get("prompt_version"):
        meta.append(f"prompts {results['prompt_version']}")
    for key in ("model", "mode", "benchmark"):
        if results.get(key):
            meta.append(f"{key} {results[key]}")
    lines += [", ".join(meta), ""]
    lines.append("| category | total | set acc. | individual acc. | confusion | valid pairs | invalid | precision |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cat, row in results.get("per_category", {}).items():
        lines.append(f"| {cat} | {row['total']} | {fmt(row['set_accuracy'], '.2f')} | {fmt(row['individual_accuracy'], '.2f')} | "
                     f"{fmt(row['confusion'], '.2f')} | {row['valid_pairs']} | {fmt(row['invalid'], '.2f')} | {fmt(row['precision'], '.2f')} |")
    lines.append(f"| **All** | {results['n_pairs']} | {fmt(results['set_accuracy'], '.2f')} | {fmt(results['individual_accuracy'], '.2f')} | "
                 f"{fmt(results['confusion'], '.2f')} | {results['valid_pairs']} | {fmt(results['invalid'], '.2f')} | {fmt(results['precision'], '.2f')} |")
    lines.append("")
    ci = results.get("ci", {})
    if ci:
        lines.append(f"{results.get('ci_level', 95)}% bootstrap CI over pairs: " + "; ".join(
            f"{name.replace('_', ' ')} {fmt_ci(bounds)}" for name, bounds in ci.items()))
        lines.append("")
    lines += [f"Note: {note}." for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    lines.append("Random guessing scores 25% set accuracy and 50% confusion.")
    return "\n".join(lines) + "\n"


def score_table(rows: list[tuple[str, Mapping[str, Any]]]) -> str:
    """A compact console table of several results (one row per name)."""
    header = f"{'model':<28} {'set acc.':>16} {'individual':>10} {'confusion':>16} {'invalid':>8}"
    lines = [header, "-" * len(header)]
    for name, res in rows:
        lines.append(f"{name:<28} {fmt(res['set_accuracy'], '5.1f')} {fmt_ci(res['ci']['set_accuracy']):>10} "
                     f"{fmt(res['individual_accuracy'], '10.1f'):>10} {fmt(res['confusion'], '5.1f'):>5} "
                     f"{fmt_ci(res['ci']['confusion']):>10} {fmt(res['invalid'], '8.1f'):>8}")
    return "\n".join(lines)
