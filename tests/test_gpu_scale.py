"""bench/gpu_scale.py's code path on the CPU (``--dry-run-on-cpu``: the real architectures at reduced width, the real
image settings): each model's processor gives the architecture's image-token count, the plain script trains the
recipe's loss curve, and scoring at batch sizes 1 and 8 agrees."""
from __future__ import annotations

import pytest

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
