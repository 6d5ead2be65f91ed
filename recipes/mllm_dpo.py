"""mllm_dpo: preference tuning of an MLLM on confusing pairs, with the pair image-contrast term.

For each image: chosen = its correct option's letter, rejected = the other letter (TRL DPOTrainer,
LoRA; the reference model is the base: TRL's frozen copy of the fresh, zero adapters). Plain DPO shares one
image between chosen and rejected, so it can be satisfied by text priors alone. Confusing pairs
give the missing conditional preference for free (mDPO): the same prompt and the same correct
answer should be likelier with the image it belongs to than with the pair-partner image, which
needs the opposite answer. ``image_contrast_weight: 0`` is plain DPO, the baseline. The term costs no
forward of its own: the two images of a pair share the prompt, so a chosen answer with the partner image
is the partner's rejected row, already in DPO's batch; a step costs what plain DPO's does (bench/dpo_contrast.py).

    unconfuse train mllm_dpo --config configs/mllm_dpo/tiny.yaml [key=value ...]

Story: data (run directory, pairs, leakage audit) -> trainer arguments (before the model: ZeRO-3 partitions
it as it loads) -> model (+ LoRA) -> trainer (DPOTrainer + image-contrast term, whole-pair batches) -> base test scores (adapters
disabled) -> validation callback -> train -> test scores of the selected adapters, loaded in place.
Shares its data and LoRA settings with mllm_sft.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from trl import DPOConfig, DPOTrainer

from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.runs import RunResults
from unconfuse.recipes import recipe_cli
from unconfuse.train import lifecycle
from unconfuse.train.checkpoints import trainer_arguments
from unconfuse.train.config import Settings, setting, to_dict
from unconfuse.train.data import PairBatches
from unconfuse.train.losses import image_contrast_loss
from unconfuse.train.mllm import (AnchoredToBase, MllmData, MllmRecipeSettings, attach_lora, evaluator, letter_examples,
                                  load_best_adapters, load_mllm, replay_examples, retention_evaluator, warm_start,
                                  with_eval_bos)
from unconfuse.train.replay import with_replay

RECIPE = "mllm_dpo"


@dataclass
class PreferenceSettings(Settings):
    """The preference loss: DPO, the pair image-contrast term, and an optional SFT term."""

    beta: float = setting(0.1, "DPO temperature (also of the image-contrast term)", gt=0)
    image_contrast_weight: float = setting(1.0, "weight of the pair image-contrast term; 0 = plain DPO", min=0)
    sft_weight: float = setting(0.0, "RPO-style NLL on the chosen answer (TRL's sft loss term)", min=0)


@dataclass
class MllmDpoConfig(MllmRecipeSettings):
    """mllm_dpo's settings: YAML keys, or ``key=value`` on the command line."""

    strategy: str | None = setting(None, "name that groups runs in compare and W&B (default: dpo+image-contrast, "
                                         "or dpo when the weight is 0; +replay with data.replay)")
    preference: PreferenceSettings = setting(help="the preference loss", factory=PreferenceSettings)


CONFIG_CLASS = MllmDpoConfig


def preference_examples(bench: Benchmark, prompts, cfg: MllmData, seed: int, same_size_pairs: bool = False) -> list[dict[str, Any]]:
    """Two preference examples per pair (rows 2k, 2k+1): chosen = the correct letter, rejected = the other.
    ``same_size_pairs`` pads the two images of each pair onto one black canvas (no resizing), for models
    whose image-token count follows the image size (see ``image_tokens_vary``)."""
    examples = letter_examples(bench, prompts, cfg, seed)
    if same_size_pairs:
        for first, second in zip(examples[0::2], examples[1::2]):
            first["image"], second["image"] = same_canvas(first["image"], second["image"])
    return [{"images": [ex["image"]], "prompt": [{"role": "user", "content": ex["prompt"]}],
             "chosen": [{"role": "assistant", "content": ex["correct"]}],
             "rejected": [{"role": "assistant", "content": ex["other"]}]}
            for ex in examples]


def same_canvas(first, second):
    """Both images centred on a black canvas of their largest width and height (content unscaled)."""
    from PIL import ImageOps

    width, height = max(first.width, second.width), max(first.height, second.height)

    def pad(image):
        left, top = (width - image.width) // 2, (height - image.height) // 2
        return ImageOps.expand(image, (left, top, width - image.width - left, height - image.height - top), fill=0)

    return pad(first), pad(second)


def image_tokens_vary(processor) -> bool:
    """Whether the processor gives images of different sizes different numbers of image tokens (Qwen2/2.5-VL's
    dynamic resolution, LLaVA-NeXT's tiles). The image-contrast term pairs each chosen row with the row of the
    partner image that matches it token for token (``partner_rows``), so such models need both images of a
    pair at one size."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lengths = {len(processor(text=[text], images=[[Image.new("RGB", size)]], return_tensors="pt")["input_ids"][0])
               for size in ((64, 64), (128, 64))}
    return len(lengths) > 1


def partner_rows(inputs: dict[str, torch.Tensor], rows: int, pair_rows: int | None = None) -> torch.Tensor:
    """For each chosen row i of a whole-pair [chosen; rejected] batch (pair partners 2k, 2k+1 among its first
    ``pair_rows`` chosen rows, default all; replay rows follow them), the batch row that asks the same prompt with
    the same answer, with the pair partner's image: the partner's rejected row (the two images of a pair share the
    prompt and need opposite answers), or its chosen row where a pair's answers agree. Rows match token for token,
    so each pair's images must give one image-token count."""
    pair_rows = rows if pair_rows is None else pair_rows
    partner = torch.arange(pair_rows, device=inputs["input_ids"].device) ^ 1
    rows_of = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    found = torch.full_like(partner, -1)
    for candidate in (partner + rows, partner):  # the partner's rejected row, then its chosen row
        same = torch.stack([(v[:pair_rows] == v[candidate]).all(-1) for v in rows_of.values()]).all(0)
        found = torch.where((found < 0) & same, candidate, found)
    if (found < 0).any():
        raise ValueError("the image-contrast term needs the two images of a pair to share the prompt and to give one "
                         "image-token count; mllm_dpo's examples do (it pads a pair onto one canvas where needed)")
    return found


@contextmanager
def fused_log_probs(modules, captured: list[torch.Tensor]):
    """While open, the per-token log-probs of every fused forward (TRL's ``model(..., fused_lm_head=True)``)
    of ``modules`` are appended to ``captured``; nothing else changes."""
    def keep(module, args, kwargs, output):
        if kwargs.get("fused_lm_head"):
            captured.append(output.log_probs)

    handles = [module.register_forward_hook(keep, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PairDPOTrainer(AnchoredToBase, PairBatches, DPOTrainer):
    """DPOTrainer with whole-pair batches and the pair image-contrast term added to its loss.

    The term compares a chosen answer's log-ratio with its own image and with the partner image. The
    latter is already in DPO's batch: it is the partner's rejected row (``partner_rows``). So the term
    reads the per-row log-probs of the two forwards TRL's ``_compute_loss`` makes anyway (the policy,
    then the reference: TRL's "ref" adapter; TRL cannot precompute reference log-probs for image data),
    and TRL's own code computes the DPO loss and metrics, unchanged. Replay rows (after the pair rows of a
    batch: ``pair_rows`` counts the pair rows) take DPO's loss only."""

    count_pair_rows = True

    def __init__(self, *args, image_contrast_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_contrast_weight = image_contrast_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs["input_ids"].shape[0] // 2  # the batch is [chosen rows; rejected rows]
        pair_rows = int(inputs.pop("pair_rows", rows))
        if not self.image_contrast_weight:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if pair_rows % 2:
            raise ValueError("the image-contrast term needs whole pairs in every batch")
        partner = partner_rows(inputs, rows, pair_rows=pair_rows)
        captured: list[torch.Tensor] = []
        # the policy forward reaches self.model through any DDP/DeepSpeed wrapper; the reference forward calls it
        modules = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        with fused_log_probs(modules, captured):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if len(captured) != 2:
            raise RuntimeError(f"expected TRL's policy and reference forwards, saw {len(captured)} forwards")
        completion = inputs["completion_mask"].shape[1] - 1  # log-probs are zero outside the completion
        policy, reference = (log_probs[:, -completion:].sum(dim=1) for log_probs in captured)
        term = image_contrast_loss(policy[:pair_rows], reference[:pair_rows], policy[partner], reference[partner], self.beta)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["image_contrast"].append(term.item())
        if return_outputs:
            return result[0] + self.image_contrast_weight * term, result[1]
        return result + self.image_contrast_weight * term


def main(cfg: MllmDpoConfig, callbacks: Sequence[Any] = ()) -> RunResults:
    """Run the recipe; returns its run record (also in ``<run>/results.json``). ``callbacks``: TrainerCallbacks
    added after the run\'s own (its validation loop, checkpoints, signals)."""
    from datasets import Dataset

    # data: run directory, pairs, leakage audit
    strategy = cfg.strategy or with_replay("dpo+image-contrast" if cfg.preference.image_contrast_weight else "dpo", cfg)
    run = lifecycle.open_run(RECIPE, cfg, strategy, modes=[cfg.val_mode, *cfg.test_modes])
    sft = cfg.preference.sft_weight
    args = DPOConfig(**trainer_arguments(run, cfg.train), max_length=None,  # never cut image tokens
                     beta=cfg.preference.beta, loss_type=["sigmoid", "sft"] if sft else ["sigmoid"],
                     loss_weights=[1.0, sft] if sft else None)  # made before the model (ZeRO-3)

    # model + LoRA (disabling it gives the reference model), trainer, then the base scores
    backend, spec = load_mllm(run, RECIPE)
    model = attach_lora(backend, cfg.lora, cfg.train.seed)
    warm_start(model, run.init_adapters)  # before the trainer: TRL's reference adapter copies it
    examples = preference_examples(run.train, run.prompts, cfg.data, cfg.train.seed,
                                   same_size_pairs=bool(cfg.preference.image_contrast_weight)
                                   and image_tokens_vary(backend.processor))
    replay = replay_examples(run, "dpo", run.prompts, cfg.train.seed)
    trainer = PairDPOTrainer(model=model, args=args, processing_class=with_eval_bos(backend.processor),
                                   train_dataset=Dataset.from_list([{**ex, "replay": False} for ex in examples] + replay),
                                   pairs_per_batch=cfg.train.pairs_per_batch, replay_items=len(replay),
                                   replay_per_batch=run.replay_per_batch,
                                   image_contrast_weight=cfg.preference.image_contrast_weight,
                                   anchor_weight=cfg.lora.anchor_weight)
    evaluate = evaluator(run, spec, backend, trainer, vision_trains=cfg.lora.vision != "none" or cfg.lora.projector != "none")
    retain = retention_evaluator(run, backend, trainer)
    base = lifecycle.score_stage(run, "base", lambda bench, mode: evaluate(bench, mode, base=True), spec.name,
                                 retain=lambda rset: retain(rset, base=True))

    def save_adapters(folder):
        model.save_pretrained(str(folder))
        backend.processor.save_pretrained(str(folder))

    callback = lifecycle.validation(run, evaluate, save_adapters, val_mode=cfg.val_mode,
                                    saved_parameters=lambda: [p for p in model.parameters() if p.requires_grad], retain=retain)
    trainer.add_callback(callback)

    # train, then test the selected adapters (loaded into the trained model in place)
    lifecycle.fit(run, trainer, callbacks)
    load_best_adapters(run, model)
    final = lifecycle.score_stage(run, "test", evaluate, spec.name, retain=retain)
    return lifecycle.finish(run, spec.name, base, final, trainer, callback,
                            details={"preference": to_dict(cfg.preference)})


if __name__ == "__main__":
    sys.exit(recipe_cli(RECIPE))
