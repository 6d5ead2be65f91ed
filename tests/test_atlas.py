"""`unconfuse atlas` on fake runs whose statuses are known by construction, and the page in headless Chromium.

The sample benchmark's six pairs (DICOM and PNG images). The baseline gets s001 and s002 right; the
recipe run s001, s003 and s004 (s002 broken, s003 and s004 fixed); the eval folder s001, s002 and s005
(s005 fixed). Every other pair is answered "A" twice: one image wrong, the pair not right.
"""
import json
import shutil
import time

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.runs import RunResults, write_run_results, write_scored
from unconfuse.eval.scorer import score
from unconfuse.eval.tools.atlas import STATUSES, AtlasError, atlas_table, build_atlas, pair_status, write_atlas
from unconfuse.eval.tools.compare import CompareError

BASELINE_RIGHT = {"s001", "s002"}
RUN_RIGHT = {"s001", "s003", "s004"}
EVAL_RIGHT = {"s001", "s002", "s005"}
PAGE_ORDER = ["s002", "s003", "s004", "s005", "s006", "s001"]  # changed by some run, still confused, right


def _scored(folder, bench, bench_arg, right, **meta):
    """A scored folder right on the pairs ``right`` and answering "A" to both images elsewhere."""
    answers = {(p.id, side): p.answer(side) if p.id in right else "A" for p in bench.pairs for side in (1, 2)}
    records = [{"pair_id": pair_id, "image": side, "answer": answer} for (pair_id, side), answer in answers.items()]
    return write_scored(folder, score(bench.pairs, answers), records=records, model="tiny", mode="clip",
                        benchmark=str(bench_arg), benchmark_fingerprint=bench.fingerprint(), **meta)


def _run_dir(run, bench, bench_arg, base_right, test_right):
    base = _scored(run / "base", bench, bench_arg, base_right, strategy="base", seed=0)
    final = _scored(run / "test", bench, bench_arg, test_right, strategy="hardneg", seed=0)
    write_run_results(run, RunResults(kind="run", recipe="clip_hardneg", strategy="hardneg", model="tiny",
                                      train_data="world:train", test_data=str(bench_arg), seed=0, mode="clip",
                                      base=base, final=final, steps=2, best_step=2, best_val=None, wall_time_s=1.0,
                                      scorer_version="x", prompt_version=None))
    return run


@pytest.fixture()
def runs(sample_bench, tmp_path):
    bench = load_benchmark(sample_bench)
    run = _run_dir(tmp_path / "hardneg", bench, sample_bench, BASELINE_RIGHT, RUN_RIGHT)
    evaluated = tmp_path / "eval-other"
    _scored(evaluated, bench, sample_bench, EVAL_RIGHT, strategy="other")
    return run, evaluated


def test_pair_status():
    assert [pair_status(r, b) for r, b in [(True, True), (True, False), (False, True), (False, False)]] == \
        ["right", "fixed", "broken", "still confused"]


def test_atlas_counts_and_order(runs, tmp_path, capsys):
    run, evaluated = runs
    out = tmp_path / "atlas"
    assert main(["atlas", str(run), str(evaluated), "--baseline", str(run / "base"), "--out", str(out)]) == 0
    summary = json.loads((out / "atlas.json").read_text())
    assert summary["n_pairs"] == 6 and summary["changed_pairs"] == 4
    assert summary["baseline"]["label"] == "base (seed 0)"
    by_label = {r["label"]: r["counts"] for r in summary["runs"]}
    assert by_label == {"hardneg (seed 0)": {"fixed": 2, "broken": 1, "still confused": 2, "right": 1},
                        "other": {"fixed": 1, "broken": 0, "still confused": 3, "right": 2}}
    assert [p["id"] for p in summary["pairs"]] == PAGE_ORDER
    assert summary["pairs"][0]["statuses"] == {"hardneg (seed 0)": "broken", "other": "right"}
    page = (out / "index.html").read_text()
    assert page.count('<article class="card"') == 6
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    images = sorted(p.name for p in (out / "images").iterdir())
    assert len(images) == 9 and all(name.endswith(".png") for name in images)  # DICOM became PNG; each image once
    printed = capsys.readouterr().out
    assert "hardneg (seed 0)" in printed and str(out / "index.html") in printed

    # a single run directory is compared with its own base/
    single = write_atlas([run], tmp_path / "single")
    data = json.loads((single.parent / "atlas.json").read_text())
    assert data["baseline"]["path"] == str(run / "base")
    assert data["runs"][0]["counts"] == {"fixed": 2, "broken": 1, "still confused": 2, "right": 1}
    # no --baseline: the first directory is the baseline of the others
    first = build_atlas([evaluated, run])
    assert first.baseline.label == "other" and [r.label for r in first.runs] == ["hardneg (seed 0)"]
    assert first.counts == [{"fixed": 2, "broken": 2, "still confused": 1, "right": 1}]  # s002, s005 broken


@pytest.mark.slow
def test_atlas_wandb_table(runs, tmp_path, monkeypatch):
    run, evaluated = runs
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    import wandb

    out = tmp_path / "atlas"
    write_atlas([run, evaluated], out, run / "base", labels=["hardneg", "other"])
    table = atlas_table(build_atlas([run, evaluated], run / "base", labels=["hardneg", "other"]), out)
    assert table.columns == ["pair", "categories", "question", "option_a", "option_b", "image_1", "image_2",
                             "answer_1", "answer_2", "base (seed 0): answer_1", "base (seed 0): answer_2",
                             "hardneg: answer_1", "hardneg: answer_2", "other: answer_1", "other: answer_2",
                             "hardneg: status", "other: status"]
    assert [row[0] for row in table.data] == PAGE_ORDER
    first = dict(zip(table.columns, table.data[0]))
    assert isinstance(first["image_1"], wandb.Image) and isinstance(first["image_2"], wandb.Image)
    assert (first["hardneg: status"], first["other: status"]) == ("broken", "right")
    assert (first["hardneg: answer_1"], first["hardneg: answer_2"]) == ("A", "A")

    write_atlas([run, evaluated], out, run / "base", labels=["hardneg", "other"], wandb=True)  # same inputs: rewritten
    logged = json.loads((out / "atlas.json").read_text())["wandb"]
    assert logged["url"] is None and "offline-run-" in logged["dir"]
    assert list((tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("case", ["missing", "empty", "no predictions", "other benchmark", "labels"])
def test_atlas_bad_input(case, runs, sample_bench, tmp_path, capsys):
    run, evaluated = runs
    args = [str(run), str(evaluated)]
    expected = {"missing": "no such directory", "empty": "no results.json", "no predictions": "no test predictions",
                "other benchmark": "compare needs runs of one benchmark", "labels": "1 label(s) for 2 directories"}[case]
    if case == "missing":
        args[1] = str(tmp_path / "nowhere")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "no predictions":
        (run / "test" / "predictions.jsonl").unlink()
    elif case == "other benchmark":
        other = tmp_path / "other-bench"
        shutil.copytree(sample_bench, other)
        path = other / "pairs.jsonl"
        path.write_text(path.read_text().replace("What imaging modality is shown?", "Which modality is this?"))
        bench = load_benchmark(other)
        _scored(tmp_path / "eval-other-bench", bench, other, EVAL_RIGHT, strategy="other")
        args[1] = str(tmp_path / "eval-other-bench")
    elif case == "labels":
        args += ["--label", "only one"]
    assert main(["atlas", *args, "--out", str(tmp_path / "atlas")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    with pytest.raises((AtlasError, CompareError)):
        build_atlas(args[:2], labels=["only one"] if case == "labels" else None)


def _chromium() -> str:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; `make setup` does it as root)")
    return executable


@pytest.mark.slow  # launches a browser process
def test_atlas_in_chromium(runs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(`pip install -e '.[dev]'`)")
    executable = _chromium()
    run, evaluated = runs
    index = write_atlas([run, evaluated], tmp_path / "atlas", run / "base")
    started = time.perf_counter()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("requestfailed", lambda request: problems.append(f"{request.url}: {request.failure}"))
        page.goto(index.as_uri(), wait_until="load")

        widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 12 and all(w > 0 for w in widths), widths

        def visible() -> int:
            return page.locator("article.card:visible").count()

        assert visible() == 6 and page.inner_text("#shown") == "6"
        assert page.locator("article.card").first.locator(".pid").inner_text() == "s002"
        page.select_option("#category", "Cerebral")  # s001 and s006
        assert visible() == 2
        page.select_option("#category", "")
        page.select_option("#status", "fixed")  # by any run: s003, s004 (hardneg), s005 (other)
        assert visible() == 3 and page.inner_text("#shown") == "3"
        page.select_option("#run", "1")  # fixed by other: s005
        assert visible() == 1
        page.select_option("#run", "any")
        page.select_option("#category", "Musculoskeletal")  # fixed and musculoskeletal: s004
        assert visible() == 1
        page.select_option("#category", "")
        page.select_option("#status", "")
        assert visible() == 6
        page.click('td.count[data-run="0"][data-status="broken"]')  # a count filters to its pairs
        assert visible() == 1
        page.select_option("#status", "")
        page.select_option("#run", "any")

        screenshot = tmp_path / "atlas.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert problems == []
    assert screenshot.stat().st_size > 20_000
    print(f"screenshot: {screenshot} (browser part {time.perf_counter() - started:.1f} s)")
