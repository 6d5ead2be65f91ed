"""The scorer against an independent, procedural re-statement of the reference definitions."""
import json
import random

import pytest

from unconfuse.eval import scorer
from unconfuse.eval.pairs import Pair, load_upstream_json
from unconfuse.eval.scorer import (PredictionsError, compare, parse_reference, parse_strict, read_predictions,
                                   resolve_answers, score)


@pytest.mark.parametrize("raw, expected", [
    ("A", "A"), ("B.", "B"), ("A:", "A"), (".B", "B"), ('A")', "A"), ('("B":', "B"), ('("A")', "A"),
    ("The answer is\nB", "B"),  # newlines become spaces, "B" is a token
    ("(A)", None), ("a", None), ("A, B", "B"), ("A B", None), ("", None), (None, None),
    ("Answer: A", "A"), ("A) pneumothorax", None), ("B,", None),
])
def test_reference_parser_quirks(raw, expected):
    assert parse_reference(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("A", "A"), ("(A)", "A"), ("b", "B"), ("**B**", "B"), ('A")', "A"), ("A: Critical stenosis", "A"),
    ("B) the second", "B"), ("Answer: A", "A"), ("The answer is (B).", "B"), ("I choose option A.", "A"),
    ("Partially thrombosed aneurysm", "B"), ("critical stenosis.", "A"),
    ("A or B", None), ("A, B", None), ("A small nodule is seen", None), ("", None), (None, None),
    ("The answer is A, not B", "A"),
])
def test_strict_parser(raw, expected):
    assert parse_strict(raw, ("Critical stenosis", "Partially thrombosed aneurysm")) == expected


def reference_style_table(pairs, answers):
    """The reference's bookkeeping, restated: per pair, add to per-category counters, then divide."""
    cats = sorted({c for p in pairs for c in p.categories_1 + p.categories_2})
    keys = cats + ["total"]
    t = {name: dict.fromkeys(keys, 0) for name in ("set", "indiv", "confused", "invalid", "valids", "valid_pairs")}
    stats = dict.fromkeys(cats, 0)
    for p in pairs:
        for c in p.categories_1 + p.categories_2:
            stats[c] += 1
        c1, c2 = answers[(p.id, 1)], answers[(p.id, 2)]
        ok1, ok2 = c1 == p.answer_1, c2 == p.answer_2
        bad1, bad2 = c1 is None, c2 is None
        confused = c1 is not None and c1 == c2
        both = p.categories_1 + p.categories_2
        if confused:
            t["confused"]["total"] += 1
            for c in both:
                t["confused"][c] += 1
        for ok, bad, side_cats in ((ok1, bad1, p.categories_1), (ok2, bad2, p.categories_2)):
            if ok:
                t["indiv"]["total"] += 1
                for c in side_cats:
                    t["indiv"][c] += 1
            if bad:
                t["invalid"]["total"] += 1
                for c in side_cats:
                    t["invalid"][c] += 1
        if not bad1 and not bad2:
            t["valids"]["total"] += 1
            for c in both:
                t["valids"][c] += 1
            if not confused:
                t["valid_pairs"]["total"] += 1
                for c in both:
                    t["valid_pairs"][c] += 1
        if ok1 and ok2:
            t["set"]["total"] += 1
            for c in both:
                t["set"][c] += 1
    out = {}
    n = len(pairs)
    for c in keys:
        denominator = n if c == "total" else stats[c]
        sides = 2 if c == "total" else 1
        out[c] = {
            "set_accuracy": 100 * t["set"][c] / denominator,
            "individual_accuracy": 100 * t["indiv"][c] / denominator / sides,
            "invalid": 100 * t["invalid"][c] / denominator / sides,
            # the reference writes 0 where the denominator is 0; the scorer writes null (undefined) there
            "confusion": 100 * t["confused"][c] / t["valids"][c] if t["valids"][c] else None,
            "precision": 100 * t["set"][c] / t["valid_pairs"][c] if t["valid_pairs"][c] else None,
        }
    return out


@pytest.mark.parametrize("seed, choices", [(0, ["A", "B", None]), (1, ["A", "B"]), (2, ["A"]), (3, [None, "B"])])
def test_scores_equal_the_reference_definitions_on_the_real_benchmark(mediconfusion_dir, seed, choices):
    pairs = load_upstream_json(mediconfusion_dir / "dataset.json")
    rng = random.Random(seed)
    answers = {(p.id, s): rng.choice(choices) for p in pairs for s in (1, 2)}
    ours = score(pairs, answers, parser="strict", bootstrap_samples=200)
    ref = reference_style_table(pairs, answers)
    for metric in ("set_accuracy", "individual_accuracy", "invalid", "confusion", "precision"):
        assert ours[metric] == pytest.approx(ref["total"][metric], abs=1e-9), metric
        for cat, row in ours["per_category"].items():
            assert row[metric] == pytest.approx(ref[cat][metric], abs=1e-9), (cat, metric)
    assert set(ours["per_category"]) == set(ref) - {"total"}
    assert ours["n_pairs"] == 176


def test_hand_computed_example():
    pairs = [Pair("1", "a", "b", "Q", "x", "y", "A", "B", ["Cardiac"], ["Cardiac", "Vascular"]),
             Pair("2", "c", "d", "Q", "x", "y", "B", "A", ["Vascular"], ["Spinal"]),
             Pair("3", "e", "f", "Q", "x", "y", "A", "B", ["Spinal"], ["Spinal"])]
    answers = {("1", 1): "A", ("1", 2): "B",   # set-correct
               ("2", 1): "A", ("2", 2): "A",   # confused, one right
               ("3", 1): None, ("3", 2): "B"}  # invalid + right
    res = score(pairs, answers, bootstrap_samples=100)
    assert res["set_accuracy"] == pytest.approx(100 / 3)
    assert res["individual_accuracy"] == pytest.approx(400 / 6)
    assert res["confusion"] == pytest.approx(50.0)   # 1 confused among 2 valid pairs
    assert res["invalid"] == pytest.approx(100 / 6)
    assert res["precision"] == pytest.approx(100.0)  # 1 set-correct among 1 valid unconfused pair
    spinal = res["per_category"]["Spinal"]  # labels: pair 2 side 2, pair 3 both sides -> 3
    assert spinal["total"] == 3
    assert spinal["set_accuracy"] == 0
    assert spinal["individual_accuracy"] == pytest.approx(200 / 3)  # pair 2 side 2 right, pair 3 side 2 right
    assert spinal["invalid"] == pytest.approx(100 / 3)
    assert spinal["confusion"] == pytest.approx(100.0)  # its only valid pair (2) is confused
    cardiac = res["per_category"]["Cardiac"]  # pair 1 counted once per side: 2 labels, 2 set hits
    assert (cardiac["total"], cardiac["set_accuracy"], cardiac["individual_accuracy"]) == (2, 100.0, 100.0)


def test_bootstrap_ci_is_fixed_and_brackets_the_estimate(mediconfusion_dir):
    pairs = load_upstream_json(mediconfusion_dir / "dataset.json")
    rng = random.Random(5)
    answers = {(p.id, s): rng.choice(["A", "B"]) for p in pairs for s in (1, 2)}
    a, b = score(pairs, answers), score(pairs, answers)
    assert a["ci"] == b["ci"]
    for metric in scorer.HEADLINE:
        lo, hi = a["ci"][metric]
        assert lo <= a[metric] <= hi and hi - lo > 1  # 176 pairs: a few points wide
    # the set-accuracy interval is close to the normal approximation
    p = a["set_accuracy"] / 100
    half = 1.96 * (p * (1 - p) / 176) ** 0.5 * 100
    assert (a["ci"]["set_accuracy"][1] - a["ci"]["set_accuracy"][0]) == pytest.approx(2 * half, rel=0.15)


def test_compare_mcnemar_and_paired_difference():
    pairs = [Pair(str(i), f"a{i}", f"b{i}", "Q", "x", "y", "A", "B") for i in range(20)]
    right = {(p.id, 1): "A" for p in pairs} | {(p.id, 2): "B" for p in pairs}
    base = dict(right)
    for i in range(8):  # base misses 8 pairs that the other gets; the other misses 1 that base gets
        base[(str(i), 2)] = "A"
    other = dict(right)
    other[("19", 1)] = "B"
    res = compare(pairs, base, other)
    assert (res["mcnemar_only_a"], res["mcnemar_only_b"]) == (1, 8)
    assert res["mcnemar_p"] == pytest.approx(2 * sum(__import__("math").comb(9, k) for k in range(2)) / 2 ** 9)
    assert res["set_accuracy_diff"] == pytest.approx(35.0)
    lo, hi = res["set_accuracy_diff_ci"]
    assert lo < 35 < hi and lo > 0
    with pytest.raises(PredictionsError, match="run B lacks"):
        compare(pairs, base, {k: v for k, v in other.items() if k[0] != "3"})


def test_predictions_file_is_validated_and_raw_is_parsed(tmp_path):
    pairs = [Pair("p1", "a", "b", "Q", "yes", "no", "A", "B")]
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"pair_id": "p1", "image": 1, "raw": "(A)"}) + "\n"
                    + json.dumps({"pair_id": "p1", "image": 2, "answer": None, "raw": "B"}) + "\n")
    preds = read_predictions(path)
    assert resolve_answers(pairs, preds, "strict") == {("p1", 1): "A", ("p1", 2): None}
    assert resolve_answers(pairs, preds, "reference") == {("p1", 1): None, ("p1", 2): None}
    path.write_text(json.dumps({"pair_id": "p1", "image": 1, "answer": "C"}) + "\n")
    with pytest.raises(PredictionsError, match="line 1: answer must be"):
        read_predictions(path)
    path.write_text(json.dumps({"pair_id": "p1", "image": 1, "answer": "A"}) + "\n")
    with pytest.raises(PredictionsError, match="p1/2"):
        resolve_answers(pairs, read_predictions(path))


def test_score_command_writes_results_and_report(tmp_path, mediconfusion_dir, capsys):
    from unconfuse.cli.commands import main

    pairs = load_upstream_json(mediconfusion_dir / "dataset.json")
    lines = [json.dumps({"pair_id": p.id, "image": s, "raw": "A" if s == 1 else "(B)"}) for p in pairs for s in (1, 2)]
    (tmp_path / "preds.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["score", "--benchmark", str(mediconfusion_dir / "dataset.json"), "--predictions",
                 str(tmp_path / "preds.jsonl"), "--out", str(tmp_path / "ref"), "--parser", "reference"]) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert ref["invalid"] == 50.0 and ref["parser"] == "reference" and ref["confusion"] is None  # no pair has two valid answers
    assert main(["score", "--benchmark", str(mediconfusion_dir / "dataset.json"), "--predictions",
                 str(tmp_path / "preds.jsonl"), "--out", str(tmp_path / "strict")]) == 0
    strict = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert strict["invalid"] == 0.0 and strict["set_accuracy"] == 50.0  # 88 of 176 pairs are (A, B)
    report = (tmp_path / "strict" / "report.md").read_text()
    assert "| **All** | 176 | 50.00 |" in report and "Nuclear Medicine" in report
    assert set(strict) >= {"set_accuracy", "individual_accuracy", "confusion", "invalid", "precision", "n_pairs",
                           "per_category", "ci", "scorer_version", "parser"}
