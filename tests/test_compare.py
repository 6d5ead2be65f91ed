"""`unconfuse compare` on fake run directories whose numbers are known by construction."""
import csv
import json
from pathlib import Path

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval.runs import RunResults, write_run_results
from unconfuse.eval.tools.compare import CompareError, run_compare

N_PAIRS = 8


@pytest.fixture()
def bench(tmp_path):
    # answers alternate (A, B) / (B, A), as in a real confusing pair
    rows = [{"id": f"p{k}", "image_1": f"i{k}a.png", "image_2": f"i{k}b.png", "question": "Which side?",
             "option_a": "left", "option_b": "right", "answer_1": "AB"[k % 2], "answer_2": "BA"[k % 2],
             "categories_1": ["Cerebral" if k < 4 else "Spinal"], "categories_2": ["Cerebral" if k < 4 else "Spinal"]}
            for k in range(N_PAIRS)]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, path


def _run(root, name, rows, bench_path, correct_pairs, strategy="hardneg", seed=0, pairs=None, retention=None):
    """A recipe-run directory whose test predictions are right on ``correct_pairs`` and answer
    "A" to both images (confused) elsewhere."""
    run = root / name
    (run / "test").mkdir(parents=True)
    lines = []
    for k, row in enumerate(rows[:pairs]):
        for side in (1, 2):
            answer = row[f"answer_{side}"] if k in correct_pairs else "A"
            lines.append(json.dumps({"pair_id": row["id"], "image": side, "answer": answer}))
    (run / "test" / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    write_run_results(run, RunResults(kind="run", recipe="clip_hardneg", strategy=strategy, model="tiny",
                                      train_data="world:train", test_data=str(bench_path), seed=seed, mode="clip",
                                      base={}, final={}, steps=2, best_step=2, best_val=None, wall_time_s=1.0,
                                      scorer_version="x", prompt_version=None, retention=retention))
    return run


def test_compare_known_numbers(bench, tmp_path, capsys):
    rows, path = bench
    base = _run(tmp_path, "base", rows, path, correct_pairs=set(), strategy="base")
    good = _run(tmp_path, "good-0", rows, path, correct_pairs={0, 1, 2, 3, 4, 5}, seed=0)
    good1 = _run(tmp_path, "good-1", rows, path, correct_pairs={0, 1, 2, 3}, seed=1)
    out = tmp_path / "cmp"
    assert main(["compare", str(good), str(good1), "--baseline", str(base), "--out", str(out)]) == 0
    table = list(csv.DictReader((out / "comparison.csv").open()))
    by_label = {r["label"]: r for r in table}
    baseline = by_label["base (seed 0) [baseline]"]
    # all-"A" answers: half the questions right, every pair confused, no pair set-correct
    assert float(baseline["set_accuracy"]) == 0 and float(baseline["confusion"]) == 100
    assert float(baseline["individual_accuracy"]) == 50
    run0 = by_label["hardneg (seed 0)"]
    assert float(run0["set_accuracy"]) == 75.0 and float(run0["confusion"]) == 25.0
    assert float(run0["set_accuracy_diff"]) == 75.0
    assert float(run0["mcnemar_p"]) == pytest.approx(2 * 0.5 ** 6)  # 6 discordant pairs, all for the run
    assert float(run0["set_accuracy[Cerebral]"]) == 100.0 and float(run0["set_accuracy[Spinal]"]) == 50.0
    group = next(r for r in table if r["row"] == "group")
    assert float(group["set_accuracy"]) == pytest.approx(62.5)  # mean of 75 and 50
    assert float(group["set_accuracy_std"]) == pytest.approx(17.6777, abs=1e-3)  # sample std of (75, 50)
    md = (out / "comparison.md").read_text()
    assert "| hardneg (seed 0) | tiny | world:train | 75.0 [" in md and "62.5 ± 17.7" in md
    assert (out / "comparison.png").stat().st_size > 5_000
    assert "hardneg over 2 seeds: set accuracy 62.5 ± 17.7" in capsys.readouterr().out


def test_compare_refuses_runs_on_other_pairs(bench, tmp_path, capsys):
    rows, path = bench
    base = _run(tmp_path, "base", rows, path, correct_pairs=set())
    partial = _run(tmp_path, "partial", rows, path, correct_pairs={0}, pairs=N_PAIRS - 2)
    assert main(["compare", str(partial), "--baseline", str(base), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert str(partial) in err and "same pairs" in err
    with pytest.raises(ValueError, match="no results.json"):
        run_compare([tmp_path], base, tmp_path / "c2")


def test_compare_refuses_results_of_another_format(bench, tmp_path, capsys):
    rows, path = bench
    base = _run(tmp_path, "base", rows, path, correct_pairs=set())
    old = _run(tmp_path, "old", rows, path, correct_pairs={0})
    record = json.loads((old / "results.json").read_text())
    (old / "results.json").write_text(json.dumps({k: v for k, v in record.items() if k != "schema_version"}))
    with pytest.raises(CompareError, match="run format None, this unconfuse reads 2"):
        run_compare([old], base, tmp_path / "c")
    (old / "results.json").write_text(json.dumps({"final": {}, "test_dir": "test"}))  # before the run format
    assert main(["compare", str(old), "--baseline", str(base), "--out", str(tmp_path / "c")]) == 2
    assert "no run format kind" in capsys.readouterr().err


def _retention(before: list[bool], after: list[bool]):
    """A run's retention block from per-item correctness, as the lifecycle writes it."""
    from unconfuse.eval.retention import RetentionItem, RetentionSet, retention_block

    rset = RetentionSet([RetentionItem(str(i), "x.png", "q?", ["a", "b"], "A") for i in range(len(before))], Path("/nonexistent"), "held-out")
    return retention_block(rset, "prefix", [{"id": str(i), "correct": c} for i, c in enumerate(before)],
                           [{"id": str(i), "correct": c} for i, c in enumerate(after)])


def test_compare_shows_gain_and_retention_change_side_by_side(bench, tmp_path, capsys):
    rows, path = bench
    base = _run(tmp_path, "base", rows, path, correct_pairs=set(), strategy="base")
    # 40 held-out items: the costly run keeps 10 of 30 right answers and breaks 20 (a significant drop);
    # the cheap run loses 2 and gains 1 (no significant change)
    before = [True] * 30 + [False] * 10
    costly = _run(tmp_path, "costly", rows, path, correct_pairs={0, 1, 2, 3, 4, 5}, strategy="hardneg",
                  retention=_retention(before, [True] * 10 + [False] * 30))
    cheap = _run(tmp_path, "cheap", rows, path, correct_pairs={0, 1}, strategy="clip-ft",
                 retention=_retention(before, [True] * 28 + [False] * 2 + [True] + [False] * 9))
    unmeasured = _run(tmp_path, "unmeasured", rows, path, correct_pairs={0}, strategy="other")
    out = tmp_path / "cmp"
    assert main(["compare", str(costly), str(cheap), str(unmeasured), "--baseline", str(base), "--out", str(out)]) == 0
    table = {r["label"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    row = table["hardneg (seed 0)"]
    assert float(row["retention_before"]) == 75.0 and float(row["retention_after"]) == 25.0
    assert float(row["retention_diff"]) == -50.0 and row["retention_significant_drop"] == "true"
    assert float(row["retention_mcnemar_p"]) == pytest.approx(2 * 0.5 ** 20)  # 20 discordant items, all lost
    low, high = float(row["retention_diff_ci_low"]), float(row["retention_diff_ci_high"])
    assert low < -50 < high < 0
    row = table["clip-ft (seed 0)"]
    assert float(row["retention_diff"]) == -2.5 and row["retention_significant_drop"] == "false"
    assert float(row["retention_mcnemar_p"]) == pytest.approx(1.0)  # 2 lost, 1 gained: binomtest(1, 3)
    assert table["other (seed 0)"]["retention_diff"] == ""
    md = (out / "comparison.md").read_text()
    assert "| hardneg (seed 0) | +75.0 [" in md and "75.0 -> 25.0: -50.0 [" in md and "**significant drop**" in md
    assert "| other (seed 0) | +12.5 [" in md and "not measured" in md
    printed = capsys.readouterr().out
    assert "75.0 -> 25.0: -50.0" in printed and "significant drop" in printed
    assert (out / "comparison.png").stat().st_size > 10_000  # two panels: vs confusion, vs retention
