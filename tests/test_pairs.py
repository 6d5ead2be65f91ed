import json

import pytest

from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.pairs import (Benchmark, BenchmarkError, load_hf_dataset, load_jsonl, load_upstream_csv,
                                  load_upstream_json, write_jsonl)


def test_upstream_json_and_csv_agree_on_the_real_benchmark(mediconfusion_dir):
    from_json = load_upstream_json(mediconfusion_dir / "dataset.json")
    from_csv = load_upstream_csv(mediconfusion_dir / "dataset.csv")
    assert len(from_json) == 176
    assert from_json == from_csv
    bench = Benchmark(from_json, mediconfusion_dir, "mc")
    assert len(bench.unique_images()) == 228
    # the reference's per-category denominators are exactly the image-side label counts
    stats = json.loads((mediconfusion_dir / "statistics.json").read_text())
    assert bench.category_counts() == stats
    answers = [(p.answer_1, p.answer_2) for p in from_json]
    assert answers.count(("A", "B")) == 88 and answers.count(("B", "A")) == 88
    first = from_json[0]
    assert first.id == "10001" and first.image_1 == "20192.jpg" and first.categories_1 == ["Cerebral", "Vascular"]
    assert first.sims["BiomedCLIP_sim"] == pytest.approx(0.9245057)


def test_jsonl_round_trip(tmp_path, mediconfusion_dir):
    pairs = load_upstream_json(mediconfusion_dir / "dataset.json")[:10]
    write_jsonl(pairs, tmp_path / "pairs.jsonl")
    assert load_jsonl(tmp_path / "pairs.jsonl") == pairs
    assert load_benchmark(tmp_path).pairs == pairs
    assert load_benchmark(tmp_path / "pairs.jsonl").image_root == tmp_path


def _record(**over):
    rec = {"id": "p1", "image_1": "a.png", "image_2": "b.png", "question": "Q?", "option_a": "x", "option_b": "y",
           "answer_1": "A", "answer_2": "B"}
    rec.update(over)
    return rec


@pytest.mark.parametrize("bad, message", [
    ({"answer_2": "C"}, "answer_2 must be 'A' or 'B'"),
    ({"option_b": "  "}, "empty option_b"),
    ({"option_a": ""}, "missing or empty field(s) option_a"),
])
def test_bad_rows_are_rejected_with_the_row_named(tmp_path, bad, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(_record(id="p0")) + "\n" + json.dumps(_record(**bad)) + "\n")
    with pytest.raises(BenchmarkError) as err:
        load_jsonl(path)
    assert f"{path}: line 2" in str(err.value) and message in str(err.value)


def test_duplicate_pair_ids_are_rejected(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(_record()) + "\n" + json.dumps(_record()) + "\n")
    with pytest.raises(BenchmarkError, match="duplicate pair id 'p1'"):
        load_jsonl(path)


def test_upstream_json_bad_answer_names_the_pair(tmp_path, mediconfusion_dir):
    data = json.loads((mediconfusion_dir / "dataset.json").read_text())
    data["10003"]["im_2_correct"] = "C"
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(BenchmarkError, match="pair 10003: answer_2"):
        load_benchmark(tmp_path)


def test_benchmark_argument_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCONFUSE_HOME", str(tmp_path / "home"))
    with pytest.raises(BenchmarkError, match="unconfuse data download"):
        load_benchmark("mediconfusion")
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="no pairs.jsonl"):
        load_benchmark(tmp_path / "empty")


def test_mediconfusion_resolves_under_unconfuse_home(tmp_path, monkeypatch, mediconfusion_dir):
    home = tmp_path / "home" / "mediconfusion"
    home.mkdir(parents=True)
    (home / "dataset.json").write_text((mediconfusion_dir / "dataset.json").read_text())
    monkeypatch.setenv("UNCONFUSE_HOME", str(tmp_path / "home"))
    bench = load_benchmark("mediconfusion")
    assert len(bench.pairs) == 176 and bench.image_root == home
    (home / "images").mkdir()
    (home / "images" / "20192.jpg").write_bytes(b"x")
    assert bench.resolve_image("20192.jpg") == home / "images" / "20192.jpg"


def test_hugging_face_dataset_with_embedded_images(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    rows = {"id": ["h1", "h2"], "image_1": imgs[:2], "image_2": imgs[2:], "question": ["Q1", "Q2"],
            "option_A": ["a", "c"], "option_B": ["b", "d"], "im_1_correct": ["A", "B"], "im_2_correct": ["B", "A"],
            "category_1": [["Cerebral"], ["Spinal"]], "category_2": [["Cerebral"], ["Cardiac"]]}
    features = datasets.Features({**{k: datasets.Value("string") for k in ("id", "question", "option_A", "option_B",
                                                                            "im_1_correct", "im_2_correct")},
                                  "image_1": datasets.Image(), "image_2": datasets.Image(),
                                  "category_1": datasets.List(datasets.Value("string")),
                                  "category_2": datasets.List(datasets.Value("string"))})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    pairs, root = load_hf_dataset(str(tmp_path / "hf"), image_cache=tmp_path / "cache")
    assert [p.id for p in pairs] == ["h1", "h2"] and pairs[1].answer_1 == "B" and pairs[1].categories_2 == ["Cardiac"]
    bench = load_benchmark(tmp_path / "hf")
    exported = np.asarray(Image.open(bench.resolve_image(bench.pairs[0].image_2)))
    assert (exported == np.asarray(imgs[2])).all()
