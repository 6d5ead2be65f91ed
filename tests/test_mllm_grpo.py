"""mllm_grpo: the letter + pair reward, whole pairs per generation batch, and 2 steps on tiny models."""
import json
import math
from collections import Counter

import pytest

from unconfuse.eval.runs import read_run_results
from unconfuse.eval.scorer import parse_strict
from unconfuse.recipes import mllm_grpo
from unconfuse.recipes.mllm_grpo import GrpoSettings, MllmGrpoConfig, pair_rewards
from unconfuse.train.config import TrainSettings
from unconfuse.train.data import PairRepeatSampler
from unconfuse.train.mllm import MllmData, MllmLora


def config(world, out, model="tiny-llava", **grpo):
    return MllmGrpoConfig(
        model=model, output_dir=str(out), report_to="none", val_mode="greedy", test_modes=["greedy"],
        lora=MllmLora(dropout=0.0), grpo=GrpoSettings(**{"num_generations": 2, "rollouts": "letters", **grpo}),
        data=MllmData(train=str(world.root / "train"), val=str(world.root / "val"), test=str(world.root / "test"),
                      retention="none"),  # retention runs in test_recipes' 2-step runs of the shipped config
        train=TrainSettings(max_steps=2, pairs_per_batch=2, learning_rate=1e-2, warmup_steps=0, eval_steps=2,
                            save_steps=2, logging_steps=1))


def test_reward_pays_the_letter_and_the_pair_event_exactly():
    # pair 7: image 1's answer is A, image 2's is B; four rollouts each, in TRL's conversational form
    first = ["A", "B", "(A)", "A: effusion"]  # right, wrong, right, right: 3/4
    second = [" B", "A", "pneumo", "B."]  # right, wrong, invalid, right: 2/4
    completions = [[{"role": "assistant", "content": c}] for c in first + second]
    right, pair = pair_rewards(completions, ["A"] * 4 + ["B"] * 4, [7] * 8, [0] * 4 + [1] * 4)
    assert right == [1, 0, 1, 1, 1, 0, 0, 1]
    assert pair == [0.5, 0, 0.5, 0.5, 0.75, 0, 0, 0.75]  # own right x the partner's share of right rollouts
    # a confused pair (one letter for both images) never earns the pair term; a solved one earns it in full
    right, pair = pair_rewards(["A", "A", "A", "A"], ["A", "A", "B", "B"], [0] * 4, [0, 0, 1, 1])
    assert right == [1, 1, 0, 0] and pair == [0, 0, 0, 0]
    right, pair = pair_rewards(["A", "A", "B", "B"], ["A", "A", "B", "B"], [0] * 4, [0, 0, 1, 1])
    assert right == pair == [1, 1, 1, 1]


def test_reward_refuses_a_batch_without_the_partner():
    with pytest.raises(ValueError, match=r"pair\(s\) \[3\] without its partner"):
        pair_rewards(["A", "B", "A", "B"], ["A", "A", "B", "B"], [2, 2, 3, 3], [0, 1, 0, 0])


def test_grouped_std_would_cancel_the_pair_term_batch_std_keeps_it():
    """Why scale_rewards is batch or none: the pair term is a per-group factor on the letter reward."""
    import torch

    right = torch.tensor([[1.0, 0, 1, 1], [1, 0, 0, 1]])  # the two images of the pair above
    partner = right.mean(1).flip(0).unsqueeze(1)
    reward = right * (1 + partner)  # pair_weight 1

    def group(r):
        return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)

    assert torch.allclose(group(reward), group(right), atol=1e-3)
    batch = (reward - reward.mean(1, keepdim=True)) / reward.std()
    alone = (right - right.mean(1, keepdim=True)) / right.std()
    assert not torch.allclose(batch / alone.clamp(min=1e-9), torch.ones_like(batch))


def test_sampler_puts_whole_pairs_with_all_their_rollouts_in_every_slice():
    sampler = PairRepeatSampler(n_pairs=5, generations=3, pairs_per_generation=2, repeat_count=2, seed=1)
    stream = list(sampler)
    assert len(stream) == len(sampler) == 2 * 2 * 2 * 3 * 2  # 2 chunks (5th pair dropped) x 2 repeats x 2 pairs x 6
    chunk = 2 * 2 * 3
    for start in range(0, len(stream), chunk // 2):  # two processes: each takes half a chunk, one pair
        rows = stream[start:start + chunk // 2]
        assert rows == [rows[0]] * 3 + [rows[0] ^ 1] * 3 and rows[0] % 2 == 0
    assert stream[:chunk] == stream[chunk:2 * chunk]  # each generation batch is read once per step that uses it
    pairs = [row // 2 for row in stream[::6]]  # one entry per pair per repeat
    assert len(set(pairs)) == 4 and Counter(pairs) == {p: 2 for p in set(pairs)}
    sampler.set_epoch(1)  # a new pair order each epoch, drawn from seed + epoch (a resumed run sees the same)
    assert list(sampler) != stream
    with pytest.raises(ValueError, match="cannot fill one generation batch"):
        PairRepeatSampler(n_pairs=1, generations=2, pairs_per_generation=2)


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2.5-vl", "tiny-gemma3", "tiny-llava-next"])
def test_letter_rollouts_sample_only_the_tokens_greedy_mode_compares(world, model):
    from unconfuse.eval.benchmarks import load_benchmark
    from unconfuse.eval.models import load_model
    from unconfuse.eval.prompts import load_prompts

    backend, _ = load_model(model, device="cpu")
    example = mllm_grpo.rollout_prompts(load_benchmark(str(world.root / "train")), load_prompts(), MllmData(), 0)[0]
    suppressed = set(mllm_grpo.letters_only(backend, example)["suppress_tokens"])
    allowed = sorted(set(range(backend.model.get_output_embeddings().weight.shape[0])) - suppressed)
    assert [parse_strict(backend.tokenizer.decode([i])) for i in allowed] == ["A", "B"]  # what the reward reads


def test_two_steps_on_tiny_llava_with_whole_pairs_in_every_reward_batch(world, tmp_path, monkeypatch):
    seen = []

    def recording(completions, answer, pair_id, side):
        seen.append(Counter(zip(pair_id, side)))
        return pair_rewards(completions, answer, pair_id, side)

    monkeypatch.setattr(mllm_grpo, "pair_rewards", recording)
    results = mllm_grpo.main(config(world, tmp_path / "run", beta=0.1))
    assert results.strategy == "grpo" and results.steps == 2
    assert read_run_results(tmp_path / "run") == results
    for stage in (results.base, results.final):
        assert all(math.isfinite(stage[m]) for m in ("set_accuracy", "individual_accuracy", "invalid"))
    # each reward call: 2 pairs x 2 images x 2 rollouts, both images of each pair with all their rollouts
    assert len(seen) == 4  # 2 steps x (letter, pair)
    for batch in seen:
        assert len({p for p, _ in batch}) == 2 and set(batch.values()) == {2}
        assert all((p, 1 - s) in batch for p, s in batch)
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the base, the KL reference
    assert logs[0]["completions/mean_length"] == 1  # letters: one token
    assert 0 <= logs[0]["rewards/pair/mean"] <= logs[0]["rewards/letter/mean"] <= 1
    assert (tmp_path / "run" / "checkpoints" / "best" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "best" / "ref").exists()  # the reference is the base, not a copy


@pytest.mark.parametrize("twin,rollouts", [pytest.param("tiny-qwen2.5-vl", "letters", marks=pytest.mark.slow),
                                           pytest.param("tiny-gemma3", "text", marks=pytest.mark.slow),
                                           pytest.param("tiny-llava-next", "letters", marks=pytest.mark.slow)])
def test_two_steps_on_every_twin(world, tmp_path, twin, rollouts):
    """Rollouts and the GRPO loss on the newer architectures (Qwen's M-RoPE and merged patches, Gemma 3's
    token_type_ids, LLaVA-NeXT's tiles), in both rollout modes: two steps, finite numbers, short completions."""
    cfg = config(world, tmp_path / "run", model=twin, rollouts=rollouts, max_completion_length=3)
    if twin == "tiny-gemma3":  # its projector is a raw weight: LoRA cannot take it
        cfg.lora.projector = "full"
    results = mllm_grpo.main(cfg)
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert results.steps == 2 and len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(math.isfinite(results.final[m]) for m in ("set_accuracy", "individual_accuracy"))
    assert logs[0]["completions/max_length"] <= (1 if rollouts == "letters" else 3)


def test_grpo_from_an_sft_run_starts_at_its_validation_numbers(world, tmp_path):
    """init_adapters: grpo warm-started from an sft run validates at step 0 exactly where sft's selected adapters did
    (the same weights on the same val pairs), and its run fingerprint names the adapters it started from."""
    from unconfuse.recipes import mllm_sft
    from unconfuse.recipes.mllm_sft import MllmSftConfig

    sft_cfg = MllmSftConfig(model="tiny-llava", output_dir=str(tmp_path / "sft"), report_to="none", val_mode="greedy",
                            test_modes=["greedy"], lora=MllmLora(dropout=0.0),
                            data=MllmData(train=str(world.root / "train"), val=str(world.root / "val"),
                                          test=str(world.root / "test"), retention="none"),
                            train=TrainSettings(max_steps=3, pairs_per_batch=2, learning_rate=1e-2, warmup_steps=0,
                                                eval_steps=3, save_steps=3, logging_steps=1, selection="last"))
    sft = mllm_sft.main(sft_cfg)
    cfg = config(world, tmp_path / "grpo")
    cfg.init_adapters = str(tmp_path / "sft")
    mllm_grpo.main(cfg)
    sft_best = [json.loads(l) for l in (tmp_path / "sft" / "val_history.jsonl").read_text().splitlines()][-1]
    grpo_start = json.loads((tmp_path / "grpo" / "val_history.jsonl").read_text().splitlines()[0])
    assert sft.best_step == 3 and sft_best["step"] == 3 and grpo_start["step"] == 0
    assert {k: grpo_start[k] for k in ("set_accuracy", "confusion", "individual_accuracy")} == \
        {k: sft_best[k] for k in ("set_accuracy", "confusion", "individual_accuracy")}
    assert "init_adapters" in json.loads((tmp_path / "grpo" / "fingerprint.json").read_text())["data"]


def test_an_init_run_on_other_data_or_unfinished_or_other_lora_is_refused(world, tmp_path):
    from unconfuse.eval.benchmarks import load_benchmark
    from unconfuse.recipes import mllm_sft
    from unconfuse.recipes.mllm_sft import MllmSftConfig
    from unconfuse.train.config import ConfigError
    from unconfuse.train.warm_start import check_init_adapters

    sft_cfg = MllmSftConfig(model="tiny-llava", output_dir=str(tmp_path / "sft"), report_to="none", val_mode="greedy",
                            test_modes=["greedy"], data=MllmData(train=str(world.root / "train"), val=str(world.root / "val"),
                                                                 test=str(world.root / "test"), retention="none"),
                            train=TrainSettings(max_steps=1, pairs_per_batch=2, eval_steps=1, save_steps=1))
    mllm_sft.main(sft_cfg)
    with pytest.raises(ConfigError, match="was trained on other data"):
        check_init_adapters(str(tmp_path / "sft"), "tiny-llava", load_benchmark(str(world.root / "val")))
    with pytest.raises(ConfigError, match="adapts another base model"):
        check_init_adapters(str(tmp_path / "sft"), "tiny-qwen2-vl", load_benchmark(str(world.root / "train")))
    (tmp_path / "sft" / "results.json").rename(tmp_path / "sft" / "results.moved")
    with pytest.raises(ConfigError, match="has not finished"):
        check_init_adapters(str(tmp_path / "sft"), "tiny-llava", load_benchmark(str(world.root / "train")))
    (tmp_path / "sft" / "results.moved").rename(tmp_path / "sft" / "results.json")
    cfg = config(world, tmp_path / "grpo")
    cfg.init_adapters, cfg.lora.r = str(tmp_path / "sft"), 4
    with pytest.raises(ConfigError, match="its LoRA r \\(16\\) is not this run's \\(4\\)"):
        mllm_grpo.main(cfg)
