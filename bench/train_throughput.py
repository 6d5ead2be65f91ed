"""Training throughput of clip_hardneg, and the cost of its validation loop.

1. Steps/s of the recipe's trainer (transformers.Trainer, whole-pair batches, pair loss) against a
   plain open_clip loop (open_clip's ClipLoss, the same AdamW) on the same model and batches.
2. The share of training wall time spent in the validation callback at the demo's cadence.

    python bench/train_throughput.py [--steps 60]
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from unconfuse.eval.models import load_model  # noqa: E402
from unconfuse.eval.benchmarks import load_benchmark  # noqa: E402
from unconfuse.eval.world import prepare  # noqa: E402
from unconfuse.recipes import clip_hardneg  # noqa: E402
from unconfuse.recipes.clip_hardneg import ClipHardNegConfig, ClipHardNegTrainer, PairLoss  # noqa: E402
from unconfuse.train.callbacks import PairValidationCallback  # noqa: E402
from unconfuse.train.config import load_config  # noqa: E402
from unconfuse.train.data import ClipCollator, PairBatchSampler, PairItems  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip_hardneg" / "tiny.yaml"


def plain_loop(model, items, collator, batches, lr, weight_decay) -> float:
    """The open_clip way: ClipLoss on each batch, AdamW, no Trainer. Returns seconds."""
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    # the same optimizer as the Trainer's default (adamw_torch_fused), so only the training code differs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                                  fused=True)
    model.train()
    start = time.perf_counter()
    for batch_indices in batches:
        batch = collator([items[i] for i in batch_indices])
        image_features, text_features, logit_scale = model(batch["pixel_values"], batch["input_ids"])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - start


def recipe_trainer(model, items, collator, steps, cfg, out) -> float:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, learning_rate=cfg.train.learning_rate,
                             weight_decay=cfg.train.weight_decay, lr_scheduler_type="constant", warmup_steps=0,
                             logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, seed=cfg.train.seed,
                             remove_unused_columns=False, disable_tqdm=True, max_grad_norm=1.0)
    trainer = ClipHardNegTrainer(model=model, args=args, train_dataset=items, data_collator=collator,
                                 pairs_per_batch=cfg.train.pairs_per_batch, loss_config=PairLoss())
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cfg = load_config(ClipHardNegConfig, CONFIG)
    prepare(models=[cfg.model], benchmarks=[cfg.data.train, cfg.data.val])
    backend, _ = load_model(cfg.model, device="cpu")
    items = PairItems(load_benchmark(cfg.data.train), backend.preprocess)
    collator = ClipCollator(tokenize=backend.tokenizer)
    sampler = PairBatchSampler(len(items) // 2, cfg.train.pairs_per_batch, seed=0)
    batches = []
    while len(batches) < args.steps:  # the recipe's batches, epoch after epoch
        sampler.set_epoch(len(batches) // len(sampler))
        batches += list(sampler)
    batches = batches[:args.steps]
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))

    # warm up both once, then measure each on a fresh copy of the same base weights
    plain_loop(copy.deepcopy(backend.model), items, collator, batches[:3], cfg.train.learning_rate, cfg.train.weight_decay)
    plain = plain_loop(copy.deepcopy(backend.model), items, collator, batches, cfg.train.learning_rate, cfg.train.weight_decay)
    ours = recipe_trainer(copy.deepcopy(backend.model), items, collator, args.steps, cfg, tmp / "trainer")
    print(f"model {cfg.model}, {cfg.train.pairs_per_batch} pairs ({2 * cfg.train.pairs_per_batch} images) per step, "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"plain open_clip loop (ClipLoss): {args.steps / plain:6.2f} steps/s")
    print(f"clip_hardneg trainer:            {args.steps / ours:6.2f} steps/s   (ours / plain = {plain / ours:.2f}x)")

    # validation share at the demo's cadence: time inside the callback vs the whole training phase
    spent = {"callback": 0.0, "train": 0.0}
    original_run, original_train = PairValidationCallback._run, ClipHardNegTrainer.train

    def timed_run(self, step, control):
        start = time.perf_counter()
        original_run(self, step, control)
        spent["callback"] += time.perf_counter() - start

    def timed_train(self, *a, **kw):
        start = time.perf_counter()
        try:
            return original_train(self, *a, **kw)
        finally:
            spent["train"] += time.perf_counter() - start

    PairValidationCallback._run, ClipHardNegTrainer.train = timed_run, timed_train
    try:
        demo_cfg = load_config(ClipHardNegConfig, CONFIG, [f"output_dir={tmp / 'demo'}", "report_to=none"])
        clip_hardneg.main(demo_cfg)
    finally:
        PairValidationCallback._run, ClipHardNegTrainer.train = original_run, original_train
    print(f"validation callback at the demo cadence (every {demo_cfg.train.eval_steps} of {demo_cfg.train.max_steps} "
          f"steps, {len(load_benchmark(demo_cfg.data.val).pairs)} val pairs): {spent['callback']:.1f} s of "
          f"{spent['train']:.1f} s training = {100 * spent['callback'] / spent['train']:.1f}%")


if __name__ == "__main__":
    main()
