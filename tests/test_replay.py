"""Replay: general data in every batch. The world's replay set, the formats, the samplers (pairs never split),
replay items reaching each recipe's loss, and the leakage audit of replay images."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.pairs import BenchmarkError
from unconfuse.train.config import ConfigError
from unconfuse.train.data import PairBatchSampler, PairRepeatSampler
from unconfuse.train.losses import clip_hardneg_loss, multi_positive_clip_loss
from unconfuse.train.replay import (caption_items, check_fraction, load_replay, question_items, replay_per_batch,
                                    resolve_replay, wrong_option)


@pytest.fixture(scope="module")
def world(world_of):
    return world_of(42)


def test_world_replay_is_corpus_images_with_captions_and_the_retention_questions(world):
    rset = load_replay(resolve_replay("auto", load_benchmark(str(world.root / "train"))))
    corpus = [json.loads(line) for line in world.corpus.read_text().splitlines()]
    assert len(rset.items) == 2 * len(corpus)  # a modality and a body-part question per corpus image
    pair_images = {str(load_benchmark(str(world.root / s)).resolve_image(r).resolve())
                   for s in ("train", "val", "test") for r in load_benchmark(str(world.root / s)).unique_images()}
    for item, row in zip(rset.items[::2], corpus):
        assert item.image == row["image"] and item.caption == row["caption"]
        assert item.correct_option == row["modality"] and str(rset.resolve_image(item.image).resolve()) not in pair_images
    assert {item.question for item in rset.items} == {"What imaging modality is shown?", "Which body part is shown?"}
    # an encoder replays captions, answers (its right option in the clip prompt) or both
    assert len(caption_items(rset, "auto", "caption")) == len(corpus)
    answers = caption_items(rset, "auto", "answer", "a scan: {option}")
    assert answers[0][1] == f"a scan: {corpus[0]['modality']}" and len(answers) == 2 * len(corpus)


def test_auto_refuses_data_that_is_not_the_worlds(sample_bench):
    with pytest.raises(ConfigError, match="data.replay: auto finds general data for the embedded world only"):
        resolve_replay("auto", load_benchmark(str(sample_bench)))
    assert resolve_replay("none", load_benchmark(str(sample_bench))) is None


def test_fraction_is_checked_and_sets_the_share_of_each_batch():
    assert replay_per_batch(0.5, 32) == 32 and replay_per_batch(0.2, 32) == 8 and replay_per_batch(0.0, 32) == 0
    with pytest.raises(ConfigError, match="replay_fraction: must be between 0 and 0.9"):
        check_fraction("auto", 0.95)
    with pytest.raises(ConfigError, match="would never be used"):
        check_fraction("auto", 0.0)
    check_fraction("none", 0.0)


def _image(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_replay_formats_and_errors_that_name_the_row(tmp_path):
    for k in range(3):
        _image(tmp_path / f"i{k}.png", 40 * k)
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"image": "i0.png", "caption": "CT of the head."}) + "\n"
                                           + json.dumps({"image": "i1.png", "text": "MRI of the brain."}) + "\n")
    captions = caption_items(load_replay(str(tmp_path / "corpus.jsonl")), "corpus")
    assert [(p.name, t) for p, t in captions] == [("i0.png", "CT of the head."), ("i1.png", "MRI of the brain.")]
    llava = [{"id": "a", "image": "i2.png", "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                                              {"from": "gpt", "value": "A chest X-ray."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    item = load_replay(str(tmp_path / "llava.json")).items[0]
    assert item.turns == [("What is shown?", "A chest X-ray.")] and item.question is None
    assert question_items(load_replay(str(tmp_path / "llava.json")), "llava", conversations=True) == [item]
    with pytest.raises(ConfigError, match="has no questions with options"):
        question_items(load_replay(str(tmp_path / "llava.json")), "llava")  # dpo and grpo need options
    with pytest.raises(ConfigError, match="has no captioned images"):
        caption_items(load_replay(str(tmp_path / "llava.json")), "llava")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "i0.png", "caption": "x"}) + "\n"
                                        + json.dumps({"image": "i1.png", "question": "Q?", "options": ["a"], "answer": "A"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"bad.jsonl: line 2: 'options' must be a list of 2"):
        load_replay(str(tmp_path / "bad.jsonl"))
    with pytest.raises(BenchmarkError, match="not found"):
        load_replay(str(tmp_path / "missing.jsonl"))


def test_wrong_option_is_never_the_answer_and_drawn_per_seed(world):
    rset = load_replay(str(world.replay))
    for seed in (0, 1):
        assert all(wrong_option(item, seed) in item.options and wrong_option(item, seed) != item.correct_option
                   for item in rset.questions)
    by_seed = [[wrong_option(item, seed) for item in rset.questions] for seed in (0, 1)]
    assert by_seed[0] != by_seed[1]  # another seed, other rejected options (three to choose from per item)
    assert len({wrong_option(item, 0) for item in rset.questions if item.category == "modality"}) > 1


def test_batches_hold_whole_pairs_then_replay_items():
    sampler = PairBatchSampler(n_pairs=10, pairs_per_batch=3, seed=1, replay_items=7, replay_per_batch=4)
    batches = list(sampler)
    assert len(batches) == 4 and sampler.batch_size == 10
    seen_replay = []
    for batch in batches:
        pairs, replay = batch[:-4], batch[-4:]
        assert all(i < 20 for i in pairs) and all(20 <= i < 27 for i in replay)
        assert sorted(pairs) == sorted(i for p in {i // 2 for i in pairs} for i in (2 * p, 2 * p + 1))
        seen_replay += replay
    assert set(seen_replay[:7]) == set(range(20, 27))  # every replay item before any repeats
    assert batches == list(PairBatchSampler(n_pairs=10, pairs_per_batch=3, seed=1, replay_items=7, replay_per_batch=4))


def test_grpo_units_hold_whole_pairs_with_their_rollouts_then_replay_prompts():
    sampler = PairRepeatSampler(n_pairs=6, generations=2, pairs_per_generation=4, repeat_count=1, seed=0,
                                replay_items=5, replay_per_unit=1, pairs_per_unit=2)
    stream = list(sampler)
    assert len(stream) == len(sampler) == 1 * (2 * 4 + 2 * 1) * 2
    unit = (2 * 2 + 1) * 2  # one device batch: 2 pairs and 1 replay prompt, 2 rollouts each
    for start in range(0, len(stream), unit):
        rows = stream[start:start + unit]
        pairs = [i for i in rows if i < 12]
        assert rows[-2:] == [rows[-1]] * 2 and rows[-1] >= 12  # the replay prompt's rollouts close the unit
        assert all(pairs.count(2 * (i // 2)) == pairs.count(2 * (i // 2) + 1) == 2 for i in pairs)


def test_replay_items_reach_the_encoder_loss_as_their_own_contrastive_problem():
    torch.manual_seed(0)
    n_pair, n_replay = 8, 4
    image, text = (torch.nn.functional.normalize(torch.randn(n_pair + n_replay, 16), dim=-1) for _ in range(2))
    scale = torch.tensor(10.0)
    text_ids = torch.tensor([0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 6, 8])
    partner = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6, 8, 9, 10, 11])
    replay = torch.tensor([False] * n_pair + [True] * n_replay)
    parts = clip_hardneg_loss(image, text, scale, text_ids, partner, 1.0, replay=replay)
    pair_only = clip_hardneg_loss(image[:n_pair], text[:n_pair], scale, text_ids[:n_pair], partner[:n_pair], 1.0)
    replay_only = multi_positive_clip_loss(image[n_pair:], text[n_pair:], scale, text_ids[n_pair:])
    assert parts["replay"].item() == pytest.approx(replay_only.item())
    assert parts["loss"].item() == pytest.approx((2 / 3) * pair_only["loss"].item() + (1 / 3) * replay_only.item())
    moved = image.clone()
    moved[-1] = -moved[-1]  # another replay image: the loss moves
    assert clip_hardneg_loss(moved, text, scale, text_ids, partner, 1.0, replay=replay)["loss"].item() != pytest.approx(parts["loss"].item())


def test_replay_image_that_retention_asks_about_is_a_leak(world, tmp_path):
    from unconfuse.eval.leakage import LeakageError, check_leakage
    from unconfuse.eval.retention import load_retention

    retention = load_retention(str(world.root / "retention" / "test.jsonl"))
    leaked = retention.items[0]
    rows = [json.loads(line) for line in world.replay.read_text().splitlines()][:4]
    rows.append({"image": str(retention.resolve_image(leaked.image).resolve()), "caption": "a general caption"})
    (tmp_path / "replay.jsonl").write_text("".join(json.dumps({**r, "image": str(world.root / r["image"])
                                                               if not Path(r["image"]).is_absolute() else r["image"]}) + "\n"
                                                   for r in rows))
    replay = load_replay(str(tmp_path / "replay.jsonl"))
    train, val, test = (load_benchmark(str(world.root / s)) for s in ("train", "val", "test"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(LeakageError, match=r"replay images \(data.replay\) appear in \{'val': 0, 'test': 1, 'retention': 1\}"):
        check_leakage(run_dir, train, {"val": val, "test": test}, allow=False, held_out={"retention": retention}, replay=replay)
    report = json.loads((run_dir / "leakage.json").read_text())
    assert report["replay"]["splits"]["retention"]["shared_by_id"] == [str(retention.resolve_image(leaked.image).resolve())]
    clean = load_replay(str(world.replay))
    assert not check_leakage(run_dir, train, {"val": val, "test": test}, allow=False, held_out={"retention": retention},
                             replay=clean)["leak"]


def _mllm_config(recipe: str, world, out):
    from unconfuse.recipes import recipe_module

    overrides = [f"output_dir={out}", "report_to=none", "model=tiny-llava", "val_mode=greedy", "test_modes=[greedy]",
                 f"data.train={world.root / 'train'}", f"data.val={world.root / 'val'}", f"data.test={world.root / 'test'}",
                 "data.retention=none", "data.replay=auto", "data.replay_fraction=0.5", "lora.dropout=0",
                 "train.max_steps=2", "train.pairs_per_batch=2", "train.warmup_steps=0", "train.eval_steps=2",
                 "train.save_steps=2", "train.logging_steps=1"]
    if recipe == "mllm_grpo":
        overrides += ["grpo.num_generations=2", "grpo.rollouts=letters"]
    return recipe_module(recipe).CONFIG_CLASS, overrides


@pytest.mark.parametrize("recipe", ["mllm_sft", "mllm_dpo", "mllm_grpo"])
def test_mllm_replay_rows_join_every_batch_after_whole_pairs(recipe, world, tmp_path, monkeypatch):
    """Two steps of each MLLM recipe with the world's replay: every training batch holds whole pairs, then replay
    rows (4 pair rows + 4 replay rows at fraction 0.5); dpo's image-contrast term sees only the pair rows, grpo's
    reward gives replay prompts the letter reward and no pair term."""
    from unconfuse.recipes import recipe_module
    from unconfuse.train.config import load_config

    module = recipe_module(recipe)
    seen = []
    if recipe == "mllm_grpo":
        def recording(completions, answer, pair_id, side):
            seen.append(list(pair_id))
            return real(completions, answer, pair_id, side)

        real = module.pair_rewards
        monkeypatch.setattr(module, "pair_rewards", recording)
    else:
        real_iter = PairBatchSampler.__iter__

        def iterate(self):
            for batch in real_iter(self):
                seen.append(batch)
                yield batch

        monkeypatch.setattr(PairBatchSampler, "__iter__", iterate)
    if recipe == "mllm_dpo":
        real_rows = module.partner_rows
        pair_rows_seen = []

        def partner_rows(inputs, rows, pair_rows=None):
            pair_rows_seen.append((rows, pair_rows))
            return real_rows(inputs, rows, pair_rows=pair_rows)

        monkeypatch.setattr(module, "partner_rows", partner_rows)
    cls, overrides = _mllm_config(recipe, world, tmp_path / "run")
    results = module.main(load_config(cls, None, overrides))
    assert results.steps == 2
    n_pair_items = 2 * len(load_benchmark(str(world.root / "train")).pairs)
    if recipe == "mllm_grpo":
        assert seen and all(ids.count(-1) == 4 * 2 for ids in seen)  # 4 replay prompts x 2 rollouts per unit
        assert all(-1 not in ids[:8] and all(ids[:8].count(p) == 4 for p in set(ids[:8])) for ids in seen)  # whole pairs
    else:
        assert len(seen) >= 2
        for batch in seen[:2]:
            pairs, replay = batch[:4], batch[4:]
            assert len(replay) == 4 and all(i >= n_pair_items for i in replay)
            assert sorted(pairs) == sorted(i for p in {i // 2 for i in pairs} for i in (2 * p, 2 * p + 1))
    if recipe == "mllm_dpo":
        assert pair_rows_seen[:2] == [(8, 4), (8, 4)]
