"""Scores that do not depend on batch size: every scored answer records its margin and dtype, results count
the answers inside the dtype's noise band, and answers outside it are the same at batch sizes 1 and 16."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.models import load_model, resolve_model
from unconfuse.eval.prompts import load_prompts
from unconfuse.eval.runner import EvalConfig, answer_pairs, run_eval
from unconfuse.eval.scorer import NOISE_BANDS, near_ties
from unconfuse.eval.world import default_world


@pytest.fixture(scope="module")
def world_test():
    bench = load_benchmark(str(default_world().root / "test"))
    return bench, bench.pairs[:16]


@pytest.mark.parametrize("twin, dtype", [("tiny-gemma3", "bfloat16"),  # the noisiest on CPU: in the fast lane
                                         pytest.param("tiny-gemma3", "float32", marks=pytest.mark.slow),
                                         pytest.param("tiny-qwen2.5-vl", "bfloat16", marks=pytest.mark.slow),
                                         pytest.param("tiny-qwen2.5-vl", "float32", marks=pytest.mark.slow)])
def test_answers_outside_the_band_do_not_depend_on_the_batch_size(world_test, twin, dtype):
    bench, pairs = world_test
    torch.manual_seed(0)
    backend, spec = load_model(replace(resolve_model(twin), dtype=dtype))
    band = NOISE_BANDS[dtype]
    largest = 0.0
    for mode in ("greedy", "prefix"):
        cfg = EvalConfig(model=twin, mode=mode, benchmark="", out="")
        one_by_one = [r for p in pairs for r in answer_pairs(backend, spec, cfg, load_prompts(), bench, [p])]
        batched = answer_pairs(backend, spec, cfg, load_prompts(), bench, pairs)  # 16 pairs: 32 images, padded
        for alone, together in zip(one_by_one, batched):
            assert together["dtype"] == dtype
            assert together["margin"] == pytest.approx(together["scores"]["A"] - together["scores"]["B"], abs=0)
            largest = max(largest, abs(alone["margin"] - together["margin"]))
            if abs(alone["margin"]) >= band:
                assert alone["answer"] == together["answer"]
    assert largest < band / 4  # the band covers the measured noise with room
    if dtype == "bfloat16":
        assert largest > 1e-5  # teeth: 16-bit scores do move with the batch (float32: ~1e-6)


def test_near_ties_count_the_margins_inside_each_dtypes_band():
    records = [{"margin": 0.05, "dtype": "bfloat16"}, {"margin": -0.2, "dtype": "bfloat16"},
               {"margin": 5e-5, "dtype": "float32"}, {"margin": 0.05, "dtype": "float32"}, {"answer": "A"}]
    ties = near_ties(records)
    assert (ties["count"], ties["scored"]) == (2, 4)
    assert ties["by_dtype"]["bfloat16"] == {"band": 0.1, "count": 1, "scored": 2}
    assert near_ties([{"answer": "A", "raw": "A"}]) is None  # mc answers have no margin


def test_an_evaluation_reports_its_near_ties(tmp_path, world_test):
    out = tmp_path / "eval"
    results = run_eval(EvalConfig(model="tiny-llava", mode="prefix", benchmark=str(default_world().root / "test"),
                                  out=str(out), limit=8, progress=False))
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    inside = sum(abs(r["margin"]) < NOISE_BANDS["float32"] for r in records)
    assert results["near_ties"]["scored"] == len(records) == 16
    assert results["near_ties"]["count"] == inside
    assert json.loads((out / "results.json").read_text())["near_ties"] == results["near_ties"]
