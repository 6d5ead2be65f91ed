"""The clip_hardneg recipe on a tiny model and a small world: losses, resume, freezing, leakage, launchers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.leakage import LeakageError
from unconfuse.eval.models import load_model
from unconfuse.recipes import clip_hardneg
from unconfuse.recipes.clip_hardneg import ClipData, ClipHardNegConfig, PairLoss
from unconfuse.train.config import TrainSettings
from unconfuse.train.data import ClipCollator, PairBatchSampler, PairItems
from unconfuse.train.losses import clip_hardneg_loss

from .interrupt import KilledAfterStep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(world_of):
    return world_of(42)


def config(world, out, **train):
    return ClipHardNegConfig(
        model="tiny-clip", output_dir=str(out), report_to="none",
        data=ClipData(train=str(world.root / "train"), val=str(world.root / "val"), test=str(world.root / "test")),
        train=TrainSettings(**{"max_steps": 2, "pairs_per_batch": 4, "learning_rate": 1e-3, "warmup_steps": 0,
                             "eval_steps": 2, "save_steps": 2, "logging_steps": 1, **train}))


def _log(run_dir, step):
    state = json.loads((Path(run_dir) / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def first_batch_loss(world, **weights) -> float:
    """Step 1's loss recomputed independently: fresh model, the sampler's first batch, the loss function."""
    backend, _ = load_model("tiny-clip", device="cpu")
    items = PairItems(load_benchmark(str(world.root / "train")), backend.preprocess)
    batch = ClipCollator(tokenize=backend.tokenizer)([items[i] for i in next(iter(PairBatchSampler(len(items) // 2, 4, seed=0)))])
    with torch.no_grad():
        image_features, text_features, logit_scale = backend.model.train()(batch["pixel_values"], batch["input_ids"])[:3]
        return clip_hardneg_loss(image_features, text_features, logit_scale, batch["text_ids"], batch["partner"],
                                 **weights)["loss"].item()


def test_two_steps_log_the_loss_of_the_first_batch(world, tmp_path):
    results = clip_hardneg.main(config(world, tmp_path / "run"))
    history = [json.loads(l) for l in (tmp_path / "run" / "val_history.jsonl").read_text().splitlines()]
    # the selected step is the better of the two evaluations (set accuracy, then lower confusion)
    best = max(history, key=lambda h: (h["set_accuracy"], -h["confusion"]))
    assert results.steps == 2 and [h["step"] for h in history] == [0, 2] and results.best_step == best["step"]
    logged = _log(tmp_path / "run", 2)
    assert logged[0]["loss"] == pytest.approx(first_batch_loss(world), rel=1e-4)
    assert logged[1]["loss"] != logged[0]["loss"]
    for name in ("config.yaml", "leakage.json", "val_history.jsonl", "base/results.json", "test/predictions.jsonl",
                 "test/results.json", "checkpoints/best/open_clip_model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved["base"]) >= {"set_accuracy", "confusion", "ci", "per_category"} and saved["strategy"] == "hardneg"


def test_replay_and_distillation_reach_the_first_steps_loss(world, tmp_path):
    """The logged loss of step 1 with replay (corpus captions and answers beside the pairs) and distillation toward
    the frozen base, recomputed by hand: the sampler's first batch, the pair part and the replay part weighted by
    their shares, plus the distillation term (the student is the teacher at step 1: the teacher's own
    cross-entropy, i.e. the entropy of its image-text distributions)."""
    from unconfuse.train.losses import distill_loss
    from unconfuse.train.replay import caption_items, load_replay

    cfg = config(world, tmp_path / "run")
    cfg.data.replay, cfg.data.replay_fraction, cfg.data.replay_text = "auto", 0.5, "both"
    cfg.loss.distill_weight = 0.7
    clip_hardneg.main(cfg)
    backend, _ = load_model("tiny-clip", device="cpu")
    replay = caption_items(load_replay(str(world.replay)), "auto", "both")
    items = PairItems(load_benchmark(str(world.root / "train")), backend.preprocess, replay=replay)
    sampler = PairBatchSampler((len(items) - len(replay)) // 2, 4, seed=0, replay_items=len(replay), replay_per_batch=8)
    batch = ClipCollator(tokenize=backend.tokenizer)([items[i] for i in next(iter(sampler))])
    assert batch["replay"].tolist() == [False] * 8 + [True] * 8
    with torch.no_grad():
        image, text, scale = backend.model.train()(batch["pixel_values"], batch["input_ids"])[:3]
        parts = clip_hardneg_loss(image, text, scale, batch["text_ids"], batch["partner"], replay=batch["replay"])
        distill = distill_loss(image, text, scale, image, text, scale).item()
    expected = parts["loss"].item() + 0.7 * distill
    assert _log(tmp_path / "run", 2)[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert distill > 0.1 and parts["replay"].item() > 0  # both terms are really there
    report = json.loads((tmp_path / "run" / "leakage.json").read_text())
    assert report["replay"]["train_images"] == 10 and not report["leak"]


def test_lora_reaches_a_modified_resnet_tower(tmp_path):
    """open_clip's ModifiedResNet (RN50 family, tiny-clip-base's tower) hands its attention pool's weights to
    F.multi_head_attention_forward directly: LoRA goes on its convolutions (and a pattern naming the pool's
    Linears is refused), and a backward reaches the adapters. tiny-clip-base's architecture, unpretrained."""
    from unconfuse.eval.models import ModelSpec
    from unconfuse.eval.world.tiny import build_open_clip
    from unconfuse.recipes.clip_hardneg import EncoderLora, freeze, lora_targets, open_clip_encoder
    from unconfuse.train.config import ConfigError

    build_open_clip(tmp_path / "rn", image_size=64, embed_dim=64, vision_width=16, context_length=48, vision_tower="resnet")
    backend, spec = load_model(ModelSpec(name="rn", family="open-clip", model_id=f"local-dir:{tmp_path / 'rn'}"), device="cpu")
    encoder = open_clip_encoder(backend, spec)
    targets = lora_targets(encoder, None)
    assert targets and all(isinstance(backend.model.get_submodule(t), torch.nn.Conv2d) for t in targets)
    assert not any("attnpool" in t for t in targets)
    with pytest.raises(ConfigError, match="visual.attnpool.q_proj: an adapter there would never run"):
        lora_targets(encoder, r"visual\.attnpool\.q_proj")
    freeze(encoder, "lora", EncoderLora(r=2, alpha=4))
    image, text = encoder.trained(torch.randn(2, 3, 64, 64), backend.tokenizer(["a", "b"]))[:2]
    (image @ text.T).sum().backward()
    grads = [p.grad for n, p in encoder.trained.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(world, tmp_path):
    full = clip_hardneg.main(config(world, tmp_path / "full", max_steps=8, save_steps=4, eval_steps=4))
    with pytest.raises(KeyboardInterrupt):
        clip_hardneg.main(config(world, tmp_path / "part", max_steps=8, save_steps=4, eval_steps=4), callbacks=[KilledAfterStep(6)])
    resumed_cfg = config(world, tmp_path / "part", max_steps=8, save_steps=4, eval_steps=4)
    resumed_cfg.resume_from_checkpoint = "latest"
    resumed = clip_hardneg.main(resumed_cfg)
    for key in ("set_accuracy", "confusion", "individual_accuracy"):
        assert resumed.final[key] == full.final[key]
    assert resumed.best_step == full.best_step
    assert _log(tmp_path / "part", 8)[-1]["loss"] == pytest.approx(_log(tmp_path / "full", 8)[-1]["loss"], rel=1e-5)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "best" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "best" / "open_clip_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
import transformers
from types import SimpleNamespace
from unconfuse.recipes import clip_hardneg
from tests.test_clip_hardneg import config

def save_rng_state(self, output_dir):  # weights and optimizer are on disk, trainer_state.json is not yet
    if output_dir.endswith("checkpoint-8"):
        os.kill(os.getpid(), signal.SIGKILL)

transformers.Trainer._save_rng_state = save_rng_state
clip_hardneg.main(config(SimpleNamespace(root=Path({world!r})), {out!r}, max_steps=8, save_steps=4, eval_steps=4))
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_then_resume_ends_like_an_uninterrupted_run(world, tmp_path):
    full = clip_hardneg.main(config(world, tmp_path / "full", max_steps=8, save_steps=4, eval_steps=4))
    script = KILL_DURING_SAVE.format(repo=str(REPO), world=str(world.root), out=str(tmp_path / "part"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    half_saved = tmp_path / "part" / "checkpoints" / "checkpoint-8"
    assert half_saved.is_dir() and not (half_saved / "trainer_state.json").exists()

    resumed_cfg = config(world, tmp_path / "part", max_steps=8, save_steps=4, eval_steps=4)
    resumed_cfg.resume_from_checkpoint = "latest"  # skips checkpoint-8; the dead writer's lock is gone with it
    resumed = clip_hardneg.main(resumed_cfg)
    for key in ("set_accuracy", "confusion", "individual_accuracy"):
        assert resumed.final[key] == full.final[key]
    assert resumed.best_step == full.best_step
    assert _log(tmp_path / "part", 8)[-1]["loss"] == pytest.approx(_log(tmp_path / "full", 8)[-1]["loss"], rel=1e-5)
    assert (half_saved / "trainer_state.json").exists()  # saved again, whole


def test_locked_text_tower_is_bitwise_unchanged(world, tmp_path):
    cfg = config(world, tmp_path / "run", max_steps=3, eval_steps=3, save_steps=3)
    cfg.trainable = "locked_text"
    clip_hardneg.main(cfg)
    backend, _ = load_model("tiny-clip", device="cpu")
    before = backend.model.state_dict()
    after = load_file(str(tmp_path / "run" / "checkpoints" / "best" / "open_clip_model.safetensors"))
    text = [k for k in before if not k.startswith("visual.") and k != "logit_scale"]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


def test_leakage_aborts_before_training(world, tmp_path):
    cfg = config(world, tmp_path / "run")
    cfg.data.test = cfg.data.train
    with pytest.raises(LeakageError, match="training images appear"):
        clip_hardneg.main(cfg)
    report = json.loads((tmp_path / "run" / "leakage.json").read_text())
    assert report["leak"] and report["splits"]["test"]["shared_by_id"] and report["splits"]["val"]["shared_by_id"] == []
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_zero_weights_is_the_plain_fine_tuning_baseline(world, tmp_path):
    cfg = config(world, tmp_path / "run")
    cfg.loss = PairLoss(hardneg_weight=0, image_side_weight=0)
    assert clip_hardneg.main(cfg).strategy == "clip-ft"
    # the logged loss is plain (multi-positive) InfoNCE: the pair term is really off, not just renamed
    plain, with_term = first_batch_loss(world, hardneg_weight=0), first_batch_loss(world, hardneg_weight=1.0)
    assert with_term > plain + 0.01
    assert _log(tmp_path / "run", 2)[0]["loss"] == pytest.approx(plain, rel=1e-4)


def test_wandb_runs_offline_without_a_key(world, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = config(world, tmp_path / "run")
    cfg.report_to = "wandb"
    clip_hardneg.main(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and "WANDB_MODE" not in os.environ  # offline by wandb.init's mode: the environment is left as it was
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero2", "zero3"])
def test_two_process_launch_on_cpu(world, tmp_path, launch):
    out = tmp_path / launch
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "unconfuse.cli", "train", "clip_hardneg", "--config",
           str(REPO / "configs" / "clip_hardneg" / "tiny.yaml"), "--launch", str(REPO / "configs" / "accelerate" / f"{launch}.yaml"),
           "model=tiny-clip", f"output_dir={out}", "report_to=none", "train.max_steps=4", "train.eval_steps=2",
           "train.save_steps=2", "train.logging_steps=1", "train.pairs_per_batch=4", f"data.train={world.root / 'train'}",
           f"data.val={world.root / 'val'}", f"data.test={world.root / 'test'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    # 26 training pairs in 7 batches of 4 pairs: one process needs 7 steps per epoch, two ranks
    # sharing whole batches need 4, so 4 steps make one epoch only if both processes trained
    assert state["log_history"][-1]["epoch"] == pytest.approx(1.0)
    # scoring is split across the ranks and gathered: every question once, equal to one process
    single = clip_hardneg.main(config(world, tmp_path / "single"))
    for stage in ("base", "test"):
        lines = (out / stage / "predictions.jsonl").read_text().splitlines()
        keys = [(json.loads(l)["pair_id"], json.loads(l)["image"]) for l in lines]
        assert len(keys) == len(set(keys)) == 2 * results["base"]["n_pairs"]
    two = [json.loads(l) for l in (out / "base" / "predictions.jsonl").read_text().splitlines()]
    one = [json.loads(l) for l in (tmp_path / "single" / "base" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["pair_id"], r["image"], r["answer"]) for r in two] == [(r["pair_id"], r["image"], r["answer"]) for r in one]
    assert [r["scores"]["A"] for r in two] == pytest.approx([r["scores"]["A"] for r in one], abs=1e-5)
    assert results["base"]["set_accuracy"] == single.base["set_accuracy"]
    first_val = json.loads((out / "val_history.jsonl").read_text().splitlines()[0])
    assert first_val == json.loads((tmp_path / "single" / "val_history.jsonl").read_text().splitlines()[0])


def test_lora_changes_only_the_adapted_vision_linears(world, tmp_path):
    cfg = config(world, tmp_path / "run", max_steps=3, eval_steps=3, save_steps=3, learning_rate=1e-2, selection="last")
    cfg.trainable = "lora"
    results = clip_hardneg.main(cfg)
    backend, _ = load_model("tiny-clip", device="cpu")
    before = backend.model.state_dict()
    after = load_file(str(tmp_path / "run" / "checkpoints" / "best" / "open_clip_model.safetensors"))
    assert set(after) == set(before)  # plain open_clip names: LoRA merged away
    import re

    # every linear layer of the ViT tower, and q, k, v through the attention block's in_proj_weight
    adapted = [k for k in before if re.match(r"visual\..*\.(attn\.in_proj_weight|attn\.out_proj\.weight|c_fc\.weight|c_proj\.weight)$", k)]
    others = [k for k in before if k not in adapted and not k.endswith("bias")]
    assert results.best_step == 3 and adapted and all(torch.equal(before[k], after[k]) for k in others)
    for kind in ("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight"):
        assert all(not torch.equal(before[k], after[k]) for k in adapted if k.endswith(kind)), kind


def test_a_lora_target_that_matches_nothing_is_an_error(world, tmp_path):
    from unconfuse.train.config import ConfigError

    cfg = config(world, tmp_path / "run")
    cfg.trainable, cfg.lora.target_modules = "lora", r"visual\..*\.qkv"  # timm naming on an open_clip ViT
    with pytest.raises(ConfigError, match=r"lora.target_modules .* has no module to adapt in CLIP"):
        clip_hardneg.main(cfg)


def test_frozen_vision_tower_encodes_validation_images_once(world, tmp_path, monkeypatch):
    from unconfuse.eval.models.clip import OpenClipBackend

    counts = {"images": 0}
    original = OpenClipBackend._encode_images

    def counting(self, images):
        counts["images"] += len(images)
        return original(self, images)

    monkeypatch.setattr(OpenClipBackend, "_encode_images", counting)
    n_val = len(load_benchmark(str(world.root / "val")).unique_images())
    n_test = len(load_benchmark(str(world.root / "test")).unique_images())
    runs = {}
    for trainable in ("locked_vision", "full"):
        counts["images"] = 0
        cfg = config(world, tmp_path / trainable, max_steps=4, eval_steps=2, save_steps=4)
        cfg.trainable = trainable
        # retention (auto: questions on the test images) reuses the test stage's encodings: none is encoded for it
        clip_hardneg.main(cfg)
        runs[trainable] = counts["images"]
    assert runs["locked_vision"] == n_val + 2 * n_test  # val once for 3 evaluations; test before and after
    assert runs["full"] == 3 * n_val + 2 * n_test


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_transformers_clip_trains_through_the_same_recipe(world, tmp_path, trainable):
    cfg = config(world, tmp_path / "run", max_steps=3, eval_steps=3, save_steps=3, learning_rate=1e-2, selection="last")
    cfg.model, cfg.trainable = "tiny-hf-clip", trainable
    results = clip_hardneg.main(cfg)
    best = tmp_path / "run" / "checkpoints" / "best"
    assert (best / "config.json").exists() and (best / "model.safetensors").exists()
    backend, spec = load_model(str(best), device="cpu")  # what `unconfuse eval --model DIR` does
    assert spec.family == "hf-clip" and results.final["n_pairs"] == len(load_benchmark(str(world.root / "test")).pairs)
    before, _ = load_model("tiny-hf-clip", device="cpu")
    changed = [k for k, v in before.model.state_dict().items() if not torch.equal(v, backend.model.state_dict()[k])]
    assert results.best_step == 3 and changed
    if trainable == "lora":
        assert all("vision_model" in k for k in changed)
