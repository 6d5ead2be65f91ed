"""bench/gpu_scale.py's code path on the CPU (``--dry-run-on-cpu``: the real architectures at reduced width, the real
image settings): each model's processor gives the architecture's image-token count, the plain script trains the
recipe's loss curve, and scoring at batch sizes 1 and 8 agrees."""
from __future__ import annotations

import pytest
import torch

from bench import gpu_scale


@pytest.mark.slow
def test_the_gpu_bench_runs_each_real_architecture_on_the_cpu(tmp_path):
    rows = gpu_scale.main(["--dry-run-on-cpu", "--steps", "2", "--recipes", "mllm_sft", "--work", str(tmp_path)])
    assert [row["model"] for row in rows] == ["llava-1.5-7b", "qwen2.5-vl-7b", "medgemma-4b"]
    for row in rows:  # a failure is reported in the row: none here
        sft, scored = row["mllm_sft"], row["eval"]
        assert isinstance(sft, dict) and isinstance(scored, dict), row
        assert sft["max_loss_difference"] <= 1e-5 and sft["plan_GB"] > 0 and sft["samples_per_s"] > 0
        assert scored["flips_outside_band"] == 0 and scored["largest_margin_change"] < 1e-4
        assert scored["greedy_q_per_s"] > 0 and scored["plain_mc_q_per_s"] > 0


def test_a_wrong_image_setting_is_caught(tmp_path, monkeypatch):
    # the bench checks its processor against the architecture's image-token count: LLaVA at 224 px gives 256, not 576
    real = gpu_scale._real_image_settings

    def too_small(processor, config):
        real(processor, config)
        processor["image_processor"].update(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224})

    monkeypatch.setattr(gpu_scale, "_real_image_settings", too_small)
    with pytest.raises(RuntimeError, match="gives 256 image tokens"):
        gpu_scale.random_real_model("llava-1.5-7b", tmp_path, "cpu", gpu_scale.torch.float32, shrink=True)


def test_each_measurement_is_kept_as_it_ends_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    # the device tool stops a command at 600 s: what was measured must already be in $OUT, and what would not fit is
    # skipped with its reason rather than started
    import json
    import time

    from bench import gpu_smoke

    table = tmp_path / "out" / "gpu_scale.json"
    table.parent.mkdir()
    monkeypatch.setenv("OUT", str(table.parent))
    monkeypatch.setattr(gpu_smoke, "random_pairs", lambda root, n, seed, sizes: root)
    monkeypatch.setattr(gpu_scale, "random_real_model", lambda real, *a: tmp_path / f"{real}.yaml")
    monkeypatch.setattr(gpu_scale, "release", lambda cuda: None)  # a full gc.collect: 0.1 s each with torch loaded
    seen = []

    def train_row(real, recipe, *args):
        seen.append(json.loads(table.read_text()) if table.exists() else None)
        if recipe == "mllm_sft":
            time.sleep(0.3)
            return {"samples_per_s": 1.0}
        raise AssertionError("the budget should have skipped this")

    monkeypatch.setattr(gpu_scale, "train_row", train_row)
    rows = gpu_scale.main(["--dry-run-on-cpu", "--budget-s", "0.5", "--work", str(tmp_path)])
    assert seen == [None]  # only the first measurement ran, the rest were skipped
    assert rows[0]["mllm_sft"] == {"samples_per_s": 1.0}
    assert rows[0]["mllm_dpo"].startswith("skipped:") and rows[0]["mllm_dpo"].endswith("budget 0.5 s")
    assert all(row[key].startswith("skipped:") for row in rows[1:] for key in ("mllm_sft", "eval"))
    assert json.loads(table.read_text()) == rows


def test_a_failed_measurement_is_reported_in_its_cell_and_the_run_goes_on(tmp_path, monkeypatch):
    import json

    from bench import gpu_smoke

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_smoke, "random_pairs", lambda root, n, seed, sizes: root)
    monkeypatch.setattr(gpu_scale, "random_real_model", lambda real, *a: tmp_path / f"{real}.yaml")
    monkeypatch.setattr(gpu_scale, "release", lambda cuda: None)  # a full gc.collect: 0.1 s each with torch loaded
    seen = {}

    def train_row(real, recipe, *args):
        seen[recipe] = json.loads((tmp_path / "gpu_scale.json").read_text()) if recipe != "mllm_sft" else None
        if recipe == "mllm_dpo":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"recipe": recipe}

    monkeypatch.setattr(gpu_scale, "train_row", train_row)
    monkeypatch.setattr(gpu_scale, "eval_row", lambda *a: {"greedy_q_per_s": 1.0})
    rows = gpu_scale.main(["--dry-run-on-cpu", "--models", "qwen2.5-vl-7b", "--work", str(tmp_path)])
    assert rows == [{"model": "qwen2.5-vl-7b", "build_s": rows[0]["build_s"], "mllm_sft": {"recipe": "mllm_sft"},
                     "mllm_dpo": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                     "mllm_grpo": {"recipe": "mllm_grpo"}, "eval": {"greedy_q_per_s": 1.0}}]
    # $OUT holds each measurement as it ends: grpo started with sft's row and dpo's failure already written
    assert seen["mllm_grpo"] == [{key: rows[0][key] for key in ("model", "build_s", "mllm_sft", "mllm_dpo")}]
