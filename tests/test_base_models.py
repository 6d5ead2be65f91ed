"""The world's base models are honestly confused; the same encoder trained on captions that name
the findings is not. Slow: about 4 minutes the first time (pretraining, on one thread)."""
import contextlib

import pytest
import yaml

from unconfuse.eval.models import ModelSpec, _preset_dir, load_model
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.runner import EvalConfig, run_eval
from unconfuse.eval.scorer import compare, read_predictions, resolve_answers
from unconfuse.eval.world import default_world, prepare

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # pretraining (one thread): ~4 min alone


@pytest.fixture(scope="module")
def world():
    prepare(models=["tiny-clip-base", "tiny-llava-base"])
    return default_world()


def _answers(out, bench):
    return resolve_answers(bench.pairs, read_predictions(out / "predictions.jsonl"))


def test_base_encoder_is_confused_and_a_finding_trained_one_is_not(world, tmp_path, monkeypatch):
    test = world.root / "test"
    bench = load_benchmark(test)
    base = run_eval(EvalConfig(model="tiny-clip-base", mode="clip", benchmark=str(test), out=str(tmp_path / "base"),
                               progress=False))
    assert base["set_accuracy"] <= 25 and base["confusion"] >= 70

    # the oracle: the same architecture and pretraining, on captions that always name the findings
    build = yaml.safe_load((_preset_dir() / "tiny-clip-base.yaml").read_text())["build"]
    # 800 steps: the 400 of before gave 27.5 set accuracy / 72.5 confusion on a machine whose base build scores 6.2
    # (its float rounding differs), 800 there give 52.5 / 41.2: a margin that does not hang on the CPU
    build["pretrain"] = {**build["pretrain"], "captions": "full", "steps": 800}
    oracle_spec = ModelSpec(name="tiny-clip-oracle", family="open-clip", build=build)
    from unconfuse.eval.world import tiny

    # the oracle is no ruler model (the test asks for a 25-point margin, not its exact numbers): its 800 steps may
    # use every core (2 threads: 0.13 s a step against 0.22 on one)
    monkeypatch.setattr(tiny, "_one_thread", contextlib.nullcontext)
    tiny.materialize(oracle_spec.name, build)
    monkeypatch.setattr("unconfuse.eval.models.resolve_model", lambda arg: oracle_spec)
    oracle = run_eval(EvalConfig(model="tiny-clip-oracle", mode="clip", benchmark=str(test), out=str(tmp_path / "oracle"),
                                 progress=False))
    assert oracle["set_accuracy"] >= base["set_accuracy"] + 25
    assert oracle["confusion"] <= base["confusion"] - 25
    diff = compare(bench.pairs, _answers(tmp_path / "base", bench), _answers(tmp_path / "oracle", bench))
    assert diff["set_accuracy_diff_ci"][0] > 0 and diff["mcnemar_p"] < 0.001


@pytest.mark.parametrize("mode", ["greedy", "prefix"])
def test_base_mllm_is_confused(world, tmp_path, mode):
    results = run_eval(EvalConfig(model="tiny-llava-base", mode=mode, benchmark=str(world.root / "test"),
                                  out=str(tmp_path / mode), progress=False))
    assert results["set_accuracy"] <= 25 and results["confusion"] >= 70


def test_base_mllm_learned_what_its_corpus_taught(world):
    """Not a broken model: it names the modality of test images it never saw."""
    from unconfuse.eval.images import load_image
    from unconfuse.eval.models import Query

    backend, _ = load_model("tiny-llava-base")
    bench = load_benchmark(world.root / "test")
    pairs = bench.pairs[:20]
    queries = [Query(p.image_1, load_image(bench.resolve_image(p.image_1)), "What imaging modality is shown?") for p in pairs]
    replies = backend.generate(queries, max_new_tokens=8)
    import json

    truth = {json.loads(l)["id"]: json.loads(l) for l in (world.root / "test" / "pairs.jsonl").read_text().splitlines()}
    expected = [truth[p.id]["caption_1"].split(" of the ")[0].lower() for p in pairs]
    right = sum(e in r.lower() for e, r in zip(expected, replies))
    # always answering the commonest modality of these 20 images (X-ray or CT) would get 6/20
    assert right >= 11, list(zip(expected, replies))


def test_base_models_answer_the_retention_questions_well_above_chance(world):
    """Retention measures what pretraining gave: the world's modality and body-part questions on the test images
    (4 options, chance 25%). Measured (2026-11-26, base models built on one thread): tiny-llava-base (prefix)
    57.5% [52.2, 62.8]; tiny-clip-base zero-shot 88.8% [85.3, 92.2], caption R@1 91.9% [87.5, 95.6]."""
    from unconfuse.eval.retention import answer_encoder, answer_mllm, load_retention, summarize

    rset = load_retention("world:test")
    llava, _ = load_model("tiny-llava-base", device="cpu")
    llava_scores = summarize(answer_mllm(llava, rset, "prefix"))["accuracy"]
    assert llava_scores["ci"][0] > 45
    clip, _ = load_model("tiny-clip-base", device="cpu")
    clip_scores = summarize(answer_encoder(clip, rset))
    assert clip_scores["accuracy"]["ci"][0] > 60 and clip_scores["retrieval_r1"]["ci"][0] > 60
