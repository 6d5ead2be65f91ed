"""bench/train_overhead.py compares speeds only after its plain scripts (TRL's trainers; an open_clip loop) trained
the recipe's loss curve on the recipe's batches: checked here to 1e-5, and shown to fail when the batches differ."""
from __future__ import annotations

import pytest

from bench import train_overhead


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mllm_sft", "mllm_dpo", "clip_hardneg"])
def test_the_plain_script_trains_the_recipes_loss_curve(recipe, tmp_path):
    row = train_overhead.compare(recipe, steps=4, repeats=1, tolerance=1e-5, work=tmp_path)
    assert len(row["losses"]) == 4 and row["max_loss_difference"] <= 1e-5
    assert max(row["losses"]) - min(row["losses"]) > 1e-4  # a curve that moves, not a constant
    assert row["recipe_s"] > 0 and row["plain_s"] > 0


@pytest.mark.slow
def test_other_batches_give_another_curve(tmp_path):
    captured = train_overhead.run_recipe_captured("mllm_sft", 4, tmp_path / "recipe", overrides=["lora.anchor_weight=0"])
    assert [len(b) for b in captured["batches"][:4]] == [16] * 4  # 8 whole pairs a batch
    captured["batches"] = captured["batches"][1:] + captured["batches"][:1]  # the same rows, other batches per step
    plain = train_overhead.train_plain(train_overhead.plain_trainer("mllm_sft", captured, tmp_path / "plain"))
    assert max(abs(a - b) for a, b in zip(plain.losses, captured["timed"].losses)) > 1e-4


@pytest.mark.slow
def test_plain_grpo_samples_the_recipes_rollouts_and_another_order_does_not(tmp_path):
    # grpo's compared numbers are the generation batches' |advantage| sums (its loss is ~0 by construction)
    captured = train_overhead.run_recipe_captured("mllm_grpo", 3, tmp_path / "recipe", overrides=["lora.anchor_weight=0"])
    mine = captured["timed"].losses
    same = train_overhead.train_plain(train_overhead.plain_trainer("mllm_grpo", captured, tmp_path / "plain"))
    assert len(mine) == len(same.losses) == 3 and max(abs(a - b) for a, b in zip(mine, same.losses)) <= 1e-5
    assert max(mine) - min(mine) > 1e-3  # numbers that move, not a constant
    per_step = captured["trainer"].args.generation_batch_size
    stream = captured["batches"]
    captured["batches"] = stream[per_step:2 * per_step] + stream[:per_step] + stream[2 * per_step:]  # steps 1, 2 swapped
    other = train_overhead.train_plain(train_overhead.plain_trainer("mllm_grpo", captured, tmp_path / "other"))
    assert max(abs(a - b) for a, b in zip(other.losses, mine)) > 1e-3
