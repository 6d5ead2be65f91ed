"""Retention: held-out single-image questions (and captions) scored before and after a run, their loaders,
the paired statistics, and selection with a retention floor."""
import json
from pathlib import Path

import numpy as np
import pytest

from unconfuse.eval.benchmarks import BenchmarkError
from unconfuse.eval.models import load_model
from unconfuse.eval.retention import answer_encoder, answer_mllm, load_retention, metrics_of, retention_block
from unconfuse.eval.world import synthesize
from unconfuse.recipes import clip_hardneg, mllm_sft
from unconfuse.recipes.clip_hardneg import ClipData, ClipHardNegConfig
from unconfuse.recipes.mllm_sft import MllmSftConfig
from unconfuse.train.callbacks import ValidationState
from unconfuse.train.config import ConfigError, TrainSettings
from unconfuse.train.mllm import MllmData, MllmLora


def test_the_worlds_retention_questions(world):
    rset = load_retention(world.root / "retention" / "test.jsonl")
    pairs = [json.loads(line) for line in (world.root / "test" / "pairs.jsonl").read_text().splitlines()]
    assert len(rset.items) == 2 * 2 * len(pairs)  # modality and body part, for both images of every test pair
    train_images = {p[f"image_{s}"] for p in (json.loads(line) for line in (world.root / "train" / "pairs.jsonl")
                                              .read_text().splitlines()) for s in (1, 2)}
    assert not {item.image for item in rset.items} & train_images  # held out from training
    for item in rset.items:
        assert len(item.options) == 4 and item.answer in "ABCD" and rset.resolve_image(item.image).is_file()
        assert item.caption.lower().startswith(item.correct_option.lower()) or item.correct_option in item.caption
    assert {item.category for item in rset.items} == {"modality", "anatomy"}
    letters = [item.answer for item in rset.items]
    assert len(set(letters)) == 4  # the right answer is not always in one place
    again = synthesize(world.config, world.root)  # rebuilt the same: identical file, identical fingerprint
    assert load_retention(again.root / "retention" / "test.jsonl").fingerprint() == rset.fingerprint()


def test_retention_answers_move_with_the_image(world):
    """A random model's answers are not constant: another image changes the scores (the check has teeth)."""
    rset = load_retention(world.root / "retention" / "test.jsonl")
    backend, _ = load_model("tiny-llava", device="cpu")
    items = rset.questions[:8]
    for mode in ("greedy", "prefix"):
        records = answer_mllm(backend, rset, mode, items)
        assert [r["id"] for r in records] == [i.id for i in items]
        assert all(len(r["scores"]) == 4 and r["correct"] == (r["answer"] == i.answer) for r, i in zip(records, items))
        swapped = [type(i)(i.id, items[-1 - k].image, i.question, i.options, i.answer) for k, i in enumerate(items)]
        other = answer_mllm(backend, rset, mode, swapped)
        assert any(a["scores"] != b["scores"] for a, b in zip(records, other))
    encoder, _ = load_model("tiny-clip", device="cpu")
    records = answer_encoder(encoder, rset)
    scores = metrics_of(records)
    assert len(scores["accuracy"]) == len(rset.questions) and len(scores["retrieval_r1"]) == len(rset.captioned_images())


def test_paired_statistics_on_known_numbers():
    from unconfuse.eval.retention import RetentionItem, RetentionSet

    rset = RetentionSet([RetentionItem(str(i), "x.png", "q", ["a", "b"], "A") for i in range(20)], Path("/nonexistent"),
                        "known")
    before = [{"id": str(i), "correct": i < 15} for i in range(20)]  # 75%
    after = [{"id": str(i), "correct": i < 5 or i >= 18} for i in range(20)]  # 5 kept + 2 gained = 35%
    block = retention_block(rset, "prefix", before, after)
    acc = block["metrics"]["accuracy"]
    assert (acc["before"], acc["after"], acc["diff"], acc["n"]) == (75.0, 35.0, -40.0, 20)
    from scipy.stats import binomtest

    assert acc["mcnemar_p"] == pytest.approx(binomtest(2, 12, 0.5).pvalue)  # 10 lost, 2 gained
    assert acc["diff_ci"][0] < -40 < acc["diff_ci"][1] < 0 and acc["before_ci"][0] < 75 < acc["before_ci"][1]
    assert block["headline"] == "accuracy"
    with pytest.raises(ValueError, match="different items"):
        retention_block(rset, "prefix", before, after[:-1])


def test_retention_pooled_over_folds_on_known_numbers():
    """Two folds' models on the same 20 items: per item the change is its mean over the folds; the interval
    resamples items and the test is the sign test on the items that moved (McNemar's for one fold)."""
    from scipy.stats import binomtest

    from unconfuse.eval.retention import pooled_retention_block

    before = [{"id": str(i), "correct": i < 15} for i in range(20)]  # 75% for both folds' base
    after_a = [{"id": str(i), "correct": i < 5 or i >= 18} for i in range(20)]  # 10 lost (5-14), 2 gained (18, 19)
    after_b = [{"id": str(i), "correct": i < 15} for i in range(20)]  # unchanged
    block = pooled_retention_block("known", "f", "prefix", [before, before], [after_a, after_b])
    acc = block["metrics"]["accuracy"]
    assert block["runs"] == 2 and acc["after_per_run"] == [35.0, 75.0]
    assert (acc["before"], acc["after"], acc["diff"], acc["n"]) == pytest.approx((75.0, 55.0, -20.0, 20))
    assert acc["mcnemar_p"] == pytest.approx(binomtest(2, 12, 0.5).pvalue)  # items 5-14 down, 18-19 up
    assert acc["diff_ci"][0] < -20 < acc["diff_ci"][1] < 0
    one_fold = pooled_retention_block("known", "f", "prefix", [before], [after_a])["metrics"]["accuracy"]
    assert one_fold["after"] == 35.0 and "after_per_run" not in one_fold
    with pytest.raises(ValueError, match="different items"):
        pooled_retention_block("known", "f", "prefix", [before, before], [after_a, after_b[:-1]])


def test_clip_run_reports_retention_before_and_after(world, tmp_path):
    cfg = ClipHardNegConfig(model="tiny-clip", output_dir=str(tmp_path / "run"), report_to="none",
                            data=ClipData(train=str(world.root / "train"), val=str(world.root / "val"),
                                          test=str(world.root / "test")),
                            train=TrainSettings(max_steps=3, pairs_per_batch=4, learning_rate=1e-2, warmup_steps=0,
                                                eval_steps=3, save_steps=3, logging_steps=1))
    results = clip_hardneg.main(cfg)
    rset = load_retention(world.root / "retention" / "test.jsonl")
    base, _ = load_model("tiny-clip", device="cpu")
    expected_before = metrics_of(answer_encoder(base, rset))
    block = results.retention
    assert block["benchmark"] == "retention/test.jsonl" and block["fingerprint"] == rset.fingerprint()
    for metric in ("accuracy", "retrieval_r1"):
        numbers = block["metrics"][metric]
        assert numbers["before"] == pytest.approx(100 * expected_before[metric].mean())
        assert numbers["diff"] == pytest.approx(numbers["after"] - numbers["before"])
    assert block["metrics"]["accuracy"]["n"] == len(rset.questions)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["retention"]
    assert saved == json.loads(json.dumps(block))
    assert [json.loads(line)["id"] for line in (tmp_path / "run" / "retention" / "base.jsonl").read_text().splitlines()
            if "id" in json.loads(line)] == [i.id for i in rset.questions]
    after = [json.loads(line) for line in (tmp_path / "run" / "retention" / "test.jsonl").read_text().splitlines()]
    assert block["metrics"]["retrieval_r1"]["after"] == pytest.approx(100 * np.mean([r["hit"] for r in after if "hit" in r]))


def sft_config(world, out, **train):
    return MllmSftConfig(lora=MllmLora(dropout=0.0), model="tiny-llava", output_dir=str(out), report_to="none",
                         val_mode="greedy", test_modes=["greedy"],
                         data=MllmData(train=str(world.root / "train"), val=str(world.root / "val"),
                                       test=str(world.root / "test"), retention_mode="greedy"),
                         train=TrainSettings(**{"max_steps": 2, "pairs_per_batch": 2, "learning_rate": 1e-3,
                                                "warmup_steps": 0, "eval_steps": 1, "save_steps": 2,
                                                "logging_steps": 1, **train}))


def test_sft_selects_with_a_retention_floor_on_the_validation_side(world, tmp_path):
    cfg = sft_config(world, tmp_path / "run", selection="set_accuracy_with_retention_floor", retention_floor=0.0)
    results = mllm_sft.main(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2] and all("retention" in h for h in history)
    val_items = load_retention(world.root / "retention" / "val.jsonl").questions
    assert all(h["retention"] * len(val_items) / 100 == pytest.approx(round(h["retention"] * len(val_items) / 100))
               for h in history)  # a percentage of the val-side items
    eligible = [h for h in history if h["retention"] >= history[0]["retention"]]
    assert results.best_step in [h["step"] for h in eligible]
    test_items = load_retention(world.root / "retention" / "test.jsonl").questions
    assert results.retention["mode"] == "greedy" and results.retention["metrics"]["accuracy"]["n"] == len(test_items)


def test_validation_state_respects_the_floor():
    history = [{"step": 0, "set_accuracy": 10.0, "confusion": 80.0, "retention": 60.0},
               {"step": 5, "set_accuracy": 40.0, "confusion": 50.0, "retention": 40.0},  # best pairs, retention -20
               {"step": 10, "set_accuracy": 30.0, "confusion": 60.0, "retention": 57.0}]  # within a 5-point floor
    assert ValidationState(history).best_step == 5  # plain set accuracy
    assert ValidationState(history, retention_floor=5.0).best_step == 10
    assert ValidationState(history, retention_floor=25.0).best_step == 5
    assert ValidationState(history, retention_floor=0.0).best_step == 0


def test_selection_with_a_floor_needs_validation_side_retention(world, tmp_path):
    from unconfuse.train.run_data import retention_sets

    cfg = sft_config(world, tmp_path / "x", selection="set_accuracy_with_retention_floor")
    cfg.data.val_retention = "none"
    with pytest.raises(ConfigError, match="data.val_retention"):
        retention_sets(cfg)
    cfg.data.val_retention = cfg.data.retention = str(world.root / "retention" / "test.jsonl")
    with pytest.raises(ConfigError, match="test side never drives selection"):
        retention_sets(cfg)
    cfg.data.retention = "none"
    cfg.train.selection = "set_accuracy"
    assert retention_sets(cfg) == (None, None)


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "image": "a.png", "question": "q?", "options": ["x"], "answer": "A"}', "line 1: 'options' must be"),
    ('{"id": 1, "image": "a.png", "question": "q?", "options": ["x", "y"], "answer": "C"}', "line 1: 'answer' must be"),
    ('{"id": 1, "image": "a.png", "question": "q?", "options": ["x", "x"], "answer": "A"}', "line 1: 'options' repeat"),
    ('{"id": 1, "image": "a.png"}', "line 1: neither a 'question' nor a 'caption'"),
    ('\n[1, 2]', "line 2: expected a JSON object"),
    ('{"id": 1, "image": "a.png", "caption": "c"}\n{"id": 1, "image": "b.png", "caption": "d"}', "appears twice"),
    ('{"id": 1', "line 1: not JSON")])
def test_bad_retention_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "retention.jsonl"
    path.write_text(content)
    with pytest.raises(BenchmarkError, match=message) as info:
        load_retention(path)
    assert str(path) in str(info.value)


def test_closed_ended_vqa_sets_and_captioned_folders(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)) for k in range(4)]
    vqa_rad = datasets.Dataset.from_dict({"image": images, "question": ["Is there a fracture?", "Where is it?",
                                                                        "Is the heart enlarged?", "Is it normal?"],
                                          "answer": ["yes", "left lung", "No", "no"]})
    vqa_rad.save_to_disk(str(tmp_path / "vqa_rad"))
    rset = load_retention(tmp_path / "vqa_rad")
    assert [(i.question, i.options, i.answer) for i in rset.items] == [
        ("Is there a fracture?", ["yes", "no"], "A"), ("Is the heart enlarged?", ["yes", "no"], "B"),
        ("Is it normal?", ["yes", "no"], "B")]  # open-ended answers left out
    assert all(rset.resolve_image(i.image).is_file() for i in rset.items)
    slake = datasets.Dataset.from_dict({"image": images[:3], "question": ["Is this a CT?", "这是CT吗?", "Which organ?"],
                                        "answer": ["Yes", "是", "liver"], "q_lang": ["en", "zh", "en"],
                                        "answer_type": ["CLOSED", "CLOSED", "OPEN"]})
    slake.save_to_disk(str(tmp_path / "slake"))
    assert [(i.question, i.answer) for i in load_retention(tmp_path / "slake").items] == [("Is this a CT?", "A")]
    folder = tmp_path / "roco"
    folder.mkdir()
    for k, image in enumerate(images[:2]):
        image.save(folder / f"{k}.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "CT of the head."}\n'
                                           '{"file_name": "1.png", "text": "X-ray of the chest."}\n')
    rset = load_retention(folder)
    assert rset.questions == [] and rset.captioned_images() == {"0.png": "CT of the head.", "1.png": "X-ray of the chest."}
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png"}\n')
    with pytest.raises(BenchmarkError, match=r"metadata.jsonl: line 1: missing 'caption'"):
        load_retention(folder)
