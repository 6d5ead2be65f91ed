"""Real architectures built on the meta device (parameter counts against the published ones) and
``unconfuse plan``'s memory arithmetic on the shipped real configs, all offline."""
from __future__ import annotations

from pathlib import Path

import pytest

from unconfuse.cli.plan import GPU_SIZES_GB, format_plan, make_plan, read_launch
from unconfuse.eval.models import load_model
from unconfuse.eval.models.architecture import (ArchitectureError, architecture_of, empty_model, parameter_count,
                                                real_presets)

REPO = Path(__file__).resolve().parents[1]
REAL_PRESETS = ["biomedclip", "clip-vit-b-16", "dinov2-base", "llava-1.5-7b", "llava-med-v1.5", "llava-v1.6-mistral-7b",
                "medgemma-4b", "pmc-clip", "qwen2.5-vl-7b"]
# each real model and its tiny twin: the same class, so the twin runs the real model's code path
TWIN_OF = {"llava-1.5-7b": "tiny-llava", "llava-v1.6-mistral-7b": "tiny-llava-next", "llava-med-v1.5": "tiny-llava-med",
           "qwen2.5-vl-7b": "tiny-qwen2.5-vl", "medgemma-4b": "tiny-gemma3", "biomedclip": "tiny-biomedclip",
           "pmc-clip": "tiny-pmc-clip", "clip-vit-b-16": "tiny-clip", "dinov2-base": "tiny-dinov2"}
REAL_CONFIGS = sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/*/*.yaml")
                      if p.parent.name in ("mllm_sft", "mllm_dpo", "mllm_grpo", "clip_hardneg") and p.stem != "tiny")


def test_every_real_preset_carries_its_architecture():
    assert real_presets() == REAL_PRESETS
    for name in REAL_PRESETS:
        assert architecture_of(name)["source"].startswith("https://")


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_the_real_architecture_has_the_published_parameter_count(name):
    model = empty_model(name)
    assert {p.device.type for p in model.parameters()} == {"meta"}  # no memory, no weights
    published = architecture_of(name)["parameters"]
    assert abs(parameter_count(model) - published) <= 0.01 * published


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2.5-vl-7b", "medgemma-4b", "dinov2-base", "clip-vit-b-16"])
def test_the_count_is_exact_where_the_hub_gives_it_to_the_parameter(name):
    # the hub's safetensors counts: an exact match means every dimension, layer count and vocabulary is right
    # (one layer fewer, or Gemma's lm_head untied, would be off by 1-16%)
    assert parameter_count(empty_model(name)) == architecture_of(name)["parameters"]


def test_a_wrong_dimension_moves_the_count_out_of_tolerance():
    from dataclasses import replace

    from unconfuse.eval.models import resolve_model

    spec = resolve_model("llava-1.5-7b")
    config = {**spec.architecture["config"], "text_config": {**spec.architecture["config"]["text_config"], "num_hidden_layers": 31}}
    wrong = replace(spec, architecture={**spec.architecture, "config": config})
    assert parameter_count(empty_model(wrong)) < 0.99 * spec.architecture["parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("real", sorted(TWIN_OF))
def test_each_real_model_is_built_as_the_class_of_its_tiny_twin(real):
    twin, _ = load_model(TWIN_OF[real])
    built = empty_model(real)
    twin_model = getattr(twin, "model", None)
    assert type(built).__name__ == type(twin_model).__name__


def test_a_preset_without_an_architecture_is_a_one_line_error():
    with pytest.raises(ArchitectureError, match="tiny-llava-base: no architecture block"):
        architecture_of("tiny-llava-base")


# --- unconfuse plan ---------------------------------------------------------------------------------


def test_the_plan_counts_lora_on_every_language_model_projection_exactly():
    plan = make_plan("mllm_dpo", str(REPO / "configs/mllm_dpo/qwen2_5_vl.yaml"))
    # Qwen2.5-7B, r 16: q and o 16 x (3584 + 3584), k and v 16 x (3584 + 512), gate/up/down 16 x (3584 + 18944)
    per_layer = 2 * 16 * 7168 + 2 * 16 * 4096 + 3 * 16 * 22528
    assert plan.parts["language model"]["trainable"] == 28 * per_layer == 40_370_176
    assert plan.parts["vision tower"]["trainable"] == 0  # vision: none
    assert plan.parts["projector"]["trainable"] > 0  # projector: lora (its merger's two linear layers)
    assert sum(p["total"] for p in plan.parts.values()) == plan.parameters == 8_292_166_656
    # one process, bf16: every weight in 2 bytes (+ LoRA's), DeepSpeed's 18 bytes per trainable parameter
    assert plan.weights == 2 * (plan.parameters + plan.trainable)
    assert plan.gradients_and_optimizer == 18 * plan.trainable
    assert plan.activation_checkpointing and plan.activations["on"] < plan.activations["off"] / 5
    assert plan.verdicts["80 GB"].startswith("fits on 1 x 80 GB with")


@pytest.mark.slow
def test_zero_stages_shard_what_deepspeed_shards(tmp_path):
    config = str(REPO / "configs/mllm_sft/llava_med.yaml")
    single = make_plan("mllm_sft", config)
    zero2 = make_plan("mllm_sft", config, launch=str(REPO / "configs/accelerate/zero2.yaml"))
    zero3 = make_plan("mllm_sft", config, launch=str(REPO / "configs/accelerate/zero3.yaml"))
    n = read_launch(str(REPO / "configs/accelerate/zero3.yaml")).processes
    assert (zero2.launch.zero_stage, zero3.launch.zero_stage) == (2, 3) and n == 2
    assert zero2.weights == single.weights  # ZeRO-2 keeps whole weights on every GPU
    assert zero2.gradients_and_optimizer == single.gradients_and_optimizer // zero2.launch.processes
    # ZeRO-3 shards every weight, frozen ones too, and gathers one layer (4 bytes a parameter, DeepSpeed's rule):
    # Mistral's decoder layer, 218M parameters (4096 x (4 x 4096 - 2 x 3072) + 3 x 4096 x 14336 + 2 x 4096)
    layer = 4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336 + 2 * 4096
    assert zero3.weights == single.weights // n + 4 * layer
    assert zero3.scoring >= 2 * zero3.parameters  # the recipes gather the whole model to score


def test_a_config_that_cannot_fit_says_what_to_change():
    plan = make_plan("mllm_dpo", str(REPO / "configs/mllm_dpo/llava_next_mistral.yaml"),
                     ["train.activation_checkpointing=false", "train.pairs_per_batch=8"], gpu_memory_gb=24)
    assert list(plan.verdicts) == ["24 GB"]
    assert "train.activation_checkpointing=true" in plan.verdicts["24 GB"]
    text = format_plan(plan)
    assert "language model" in text and "DeepSpeed's estimator" in text


@pytest.mark.slow
@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_every_real_config_has_a_plan(config):
    recipe = Path(config).parent.name
    plan = make_plan(recipe, str(REPO / config))
    assert set(plan.verdicts) == {f"{size:g} GB" for size in GPU_SIZES_GB}
    assert 0 < plan.trainable <= plan.parameters and plan.peak > plan.weights
    assert any(v.startswith("fits on 1 x") for v in plan.verdicts.values()), plan.verdicts


def test_the_plan_command_prints_and_refuses_in_one_line(capsys, monkeypatch):
    from unconfuse.cli.commands import main

    monkeypatch.chdir(REPO)
    assert main(["plan", "mllm_sft", "--config", "configs/mllm_sft/qwen2_5_vl.yaml", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "80 GB: fits on 1 x 80 GB" in out and "40,370,176" in out
    assert main(["plan", "mllm_sft", "--config", "configs/mllm_sft/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no architecture block" in err
    assert main(["plan", "mllm_sft", "--config", "configs/mllm_sft/qwen2_5_vl.yaml", "--launch", "nope.yaml"]) == 2
    assert "--launch nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("real", ["llava-1.5-7b", "qwen2.5-vl-7b", "medgemma-4b"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_the_planned_activations_are_what_autograd_keeps_through_the_whole_model(real, dropout):
    """The plan measures one decoder layer at two token counts and counts TRL's fused LM head; the whole model with
    that head's loss (as the recipes train: LoRA as shipped, bf16 autocast), run at a third shape, keeps what the plan
    says. The real architecture at reduced width, with its real vocabulary (the old plan's float32 logits would be
    most of the bytes here)."""
    import copy

    import torch
    from trl.trainer.utils import add_fused_lm_head

    from bench.gpu_scale import shrunk
    from unconfuse.cli import plan as planning
    from unconfuse.eval.models import ModelSpec
    from unconfuse.recipes import recipe_module
    from unconfuse.train.config import load_config

    arch = architecture_of(real)
    config = shrunk(arch["config"])
    config["text_config"]["vocab_size"] = arch["config"]["text_config"]["vocab_size"]
    spec = ModelSpec(name=f"{real}-shrunk", family="hf-vlm", architecture={**arch, "config": config})
    recipe_config = {"llava-1.5-7b": "llava_med", "qwen2.5-vl-7b": "qwen2_5_vl", "medgemma-4b": "medgemma"}[real]
    cfg = load_config(recipe_module("mllm_sft").CONFIG_CLASS, str(REPO / f"configs/mllm_sft/{recipe_config}.yaml"),
                      [f"lora.dropout={dropout}"])
    base = empty_model(spec)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # as TRL's SFTTrainer does, before PEFT
    trained = planning._trainable_model(base, spec, "mllm_sft", cfg)
    text_config = planning._text_config(base)
    layer_bytes = planning._decoder_layer_bytes(trained, (spec.name, dropout), 2)
    sequences, tokens = 2, 40
    # on a CPU (no Triton) the fused head scores every position; labels other than the answer's are -100 all the same
    shape = {"sequences": sequences, "tokens": tokens, "scored_tokens": sequences * (tokens - 1)}
    planned = planning._activation_bytes(text_config, shape, layer_bytes, 2)["off"]
    tile_tokens, tile_vocab = planning.FUSED_HEAD_TILE  # the head's working tile is not kept for backward
    tile = min(shape["scored_tokens"], tile_tokens) * min(text_config.vocab_size, tile_vocab) * 2

    whole = copy.deepcopy(trained).to_empty(device="cpu").train()
    torch.manual_seed(0)
    for param in whole.parameters():
        param.data.normal_(0, 0.02)
    hidden = torch.randn(sequences, tokens, text_config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((sequences, tokens), -100)
    labels[:, -4:] = torch.randint(0, text_config.vocab_size, (sequences, 4))
    measured = planning.saved_bytes(
        whole, lambda: whole(inputs_embeds=hidden, labels=labels, use_cache=False, fused_lm_head=True), autocast=True)
    assert abs(planned - tile - measured) <= 0.05 * measured, (planned - tile, measured)
