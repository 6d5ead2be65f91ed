"""clip_hardneg: contrastive fine-tuning of a CLIP-style encoder with confusing pairs as hard negatives.

Each batch holds whole pairs. The loss is CLIP's InfoNCE with identical texts as shared positives,
plus a NegCLIP-style term: each image must prefer its own text over its pair partner's
(``hardneg_weight``), and optionally each text its own image over the partner image
(``image_side_weight``). Both weights 0 is plain CLIP fine-tuning on the same batches: the baseline.

    unconfuse train clip_hardneg --config configs/clip_hardneg/tiny.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m unconfuse.recipes.clip_hardneg --config ...

Story: data (run directory, train/val/test pairs, leakage audit) -> model (open_clip or
transformers CLIP/SigLIP, frozen parts, LoRA) -> base test score -> trainer (transformers.Trainer,
whole-pair batches, validation callback) -> train -> test score of the selected checkpoint, loaded
the way ``unconfuse eval`` loads it.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import Trainer, TrainingArguments

from unconfuse.eval.evaluation import predict, score_records
from unconfuse.eval.models import load_model, resolve_model
from unconfuse.eval.retention import answer_encoder
from unconfuse.eval.runs import RunResults
from unconfuse.recipes import recipe_cli
from unconfuse.train import lifecycle
from unconfuse.train.checkpoints import trainer_arguments
from unconfuse.train.config import ConfigError, RecipeSettings, Settings, TrainSettings, setting, to_dict
from unconfuse.train.data import ClipCollator, PairBatches, PairItems
from unconfuse.train.distributed import process_device, whole_weights
from unconfuse.train.losses import clip_hardneg_loss, distill_loss
from unconfuse.train.replay import FRACTION_HELP, REPLAY_HELP, caption_items, with_replay

RECIPE = "clip_hardneg"


@dataclass
class ClipData(Settings):
    """Where the pairs come from, and what each image is trained to match."""

    train: str = setting("world:train", "training pairs: any benchmark argument (folder, file, hf:<id>, world:<split>)")
    val: str = setting("world:val", "validation pairs: select the checkpoint (never the test pairs)")
    test: str = setting("world:test", "test pairs: scored before and after training, never for selection")
    text: Literal["option", "question_option", "caption"] = setting(
        "option", "what each image must match: its correct option, the question and the option, or its caption")
    retention: str = setting("auto", "held-out captioned images / questions scored before and after training (zero-shot "
                                     "classification and caption retrieval R@1): auto (the world's, for world data), none, "
                                     "a JSONL file, a captioned-image folder (metadata.jsonl) or hf:<id>")
    val_retention: str = setting("auto", "the validation side's retention set (train.selection with a retention floor "
                                         "only); never the test side's")
    replay: str = setting("none", REPLAY_HELP + "; an encoder replays image-caption records (contrastive loss on them, "
                                  "no pair term)")
    replay_fraction: float = setting(0.5, FRACTION_HELP)
    replay_text: Literal["caption", "answer", "both"] = setting(
        "both", "what a replay image is matched to: its caption, its question's right option in the scoring prompt "
                   "(the text zero-shot classification compares), or both (one record each)")


@dataclass
class PairLoss(Settings):
    """The pair terms added to CLIP's InfoNCE, and the anchor to the base model."""

    hardneg_weight: float = setting(1.0, "image vs (own text, partner's text); 0 = plain CLIP fine-tuning", min=0)
    image_side_weight: float = setting(0.0, "text vs (own image, partner image)", min=0)
    hardneg_label_smoothing: float = setting(0.0, "label smoothing of the pair terms' two-way targets (FSC-CLIP's "
                                                  "calibrated hard negatives); 0 = the plain NegCLIP term", min=0)
    distill_weight: float = setting(0.0, "weight of the distillation toward the frozen base model (open_clip's "
                                         "DistillClipLoss: its image-text logits on the batch as soft targets); 0 = none",
                                    min=0)
    distill_on: Literal["batch", "replay"] = setting("batch", "the items distilled: the whole batch, or its replay "
                                                              "items only (needs data.replay)")


@dataclass
class EncoderLora(Settings):
    """LoRA on the vision tower (``trainable: lora``)."""

    r: int = setting(8, "LoRA rank", min=1)
    alpha: int = setting(16, "LoRA alpha (scale = alpha / r)", min=1)
    dropout: float = setting(0.0, "LoRA dropout", min=0)
    target_modules: str | None = setting(None, "regex (full match) over module names to adapt; default: every "
                                               "linear layer and attention block of the vision tower (q, k and v "
                                               "of nn.MultiheadAttention included), or the convolutions of a "
                                               "ModifiedResNet tower (RN50 family, tiny-clip-base)")


@dataclass
class ClipHardNegConfig(RecipeSettings):
    """clip_hardneg's settings: YAML keys, or ``key=value`` on the command line."""

    model: str = setting("tiny-clip-base", "preset, local folder, local-dir:/path, hf-hub:org/name, or hub id")
    strategy: str | None = setting(None, "name that groups runs in compare and W&B (default: hardneg, or "
                                         "clip-ft when both pair weights are 0; +replay with data.replay)")
    trainable: Literal["full", "locked_text", "locked_vision", "lora"] = setting(
        "full", "what trains: everything, the vision tower (text locked), the text tower, or LoRA on the vision tower")
    lora: EncoderLora = setting(help="LoRA settings (trainable: lora)", factory=EncoderLora)
    data: ClipData = setting(help="the pairs", factory=ClipData)
    loss: PairLoss = setting(help="the pair terms", factory=PairLoss)
    train: TrainSettings = setting(help="training settings", factory=lambda: TrainSettings(
        max_steps=150, pairs_per_batch=16, learning_rate=1e-4, weight_decay=0.1, warmup_steps=10))
    val_batch_pairs: int = setting(32, "pairs per batch when scoring val and test", min=1)


CONFIG_CLASS = ClipHardNegConfig


def strategy_name(cfg: ClipHardNegConfig) -> str:
    if cfg.strategy:
        return cfg.strategy
    return with_replay("clip-ft" if not (cfg.loss.hardneg_weight or cfg.loss.image_side_weight) else "hardneg", cfg)


# ---------------------------------------------------------------------------------------------
# The model: what the recipe needs from an encoder family


@dataclass
class TrainableEncoder:
    """An open_clip or transformers CLIP seen one way: the module to train, how to feed it, which
    parameters are the vision tower, and how to save a checkpoint that ``unconfuse eval`` loads."""

    trained: torch.nn.Module  # forward(pixel_values, text) -> (image features, text features, scale)
    weights: torch.nn.Module  # the model whose weights are saved (open_clip CLIP / transformers CLIPModel)
    preprocess: Any  # PIL image -> pixel tensor
    tokenize: Any  # list[str] -> tensor, or dict of tensors
    vision_prefixes: tuple[str, ...]  # of ``trained``'s parameter names
    tower: str  # the vision tower's module name in ``weights`` (where LoRA goes)
    save_folder: Any  # (folder, state dict) -> None: the files eval loads
    model_id: Any  # (folder) -> model argument for load_model
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # parameter shapes as loaded (DeepSpeed reshapes scalars)
    peft_model: Any = None  # set when LoRA is attached

    def is_vision(self, name: str) -> bool:
        return name.startswith(self.vision_prefixes)

    def save(self, folder: Path) -> None:
        """The weights under their original names, LoRA merged in (peft's merge_and_unload on a copy)."""
        model = copy.deepcopy(self.peft_model).merge_and_unload() if self.peft_model is not None else self.weights
        state = {k: v.detach().to("cpu").reshape(self.shapes[k]).contiguous() for k, v in model.state_dict().items()}
        self.save_folder(folder, state)


class HFClipForTraining(torch.nn.Module):
    """A transformers CLIP/SigLIP seen the way open_clip's CLIP is: forward(pixels, text) ->
    (normalised image features, normalised text features, logit scale)."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor, text: dict[str, torch.Tensor]):
        image = self.clip.get_image_features(pixel_values=pixel_values)
        texts = self.clip.get_text_features(**text)
        image, texts = (x if torch.is_tensor(x) else x.pooler_output for x in (image, texts))
        normalize = torch.nn.functional.normalize
        return normalize(image, dim=-1), normalize(texts, dim=-1), self.clip.logit_scale.exp()


def open_clip_encoder(backend, spec) -> TrainableEncoder:
    import open_clip

    model_id = spec.model_id
    if model_id.startswith("local-dir:"):
        config = json.loads((Path(model_id[len("local-dir:"):]) / "open_clip_config.json").read_text())
    elif model_id.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(model_id[len("hf-hub:"):], "open_clip_config.json")).read_text())
    else:  # an open_clip architecture name with a pretrained tag
        config = {"model_cfg": open_clip.get_model_config(model_id),
                  "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}

    def save_folder(folder: Path, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(folder / "open_clip_model.safetensors"))
        if config["model_cfg"]["text_cfg"].get("hf_tokenizer_name"):
            # a local-dir: model with a Hugging Face tokenizer reads it from the folder itself (open_clip's
            # get_tokenizer), not from hf_tokenizer_name; hf_model_name (BERT's config: architecture only,
            # the weights are in the safetensors above) stays what the base model names
            backend.tokenizer.save_pretrained(folder)

    return TrainableEncoder(backend.model, backend.model, backend.preprocess, backend.tokenizer, ("visual.",), "visual",
                            save_folder, lambda folder: f"local-dir:{folder}", _shapes(backend.model))


def hf_clip_encoder(backend, spec) -> TrainableEncoder:
    processor = backend.processor

    def preprocess(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(processor(text=texts, return_tensors="pt", padding=backend.text_padding, truncation=True))

    def save_folder(folder: Path, state: dict[str, torch.Tensor]) -> None:
        backend.model.save_pretrained(folder, state_dict=state)
        processor.save_pretrained(folder)

    return TrainableEncoder(HFClipForTraining(backend.model), backend.model, preprocess, tokenize,
                            ("clip.vision_model.", "clip.visual_projection", "vision_model.", "visual_projection"),
                            "vision_model", save_folder, str, _shapes(backend.model))


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _weights_read_directly(modules: dict[str, torch.nn.Module]) -> set[str]:
    """Linear layers whose forward is never called: open_clip's ``AttentionPool2d`` (the RN50 family's attention
    pool, tiny-clip-base's) hands its q/k/v/c_proj weights to ``F.multi_head_attention_forward`` itself, so an
    adapter on those Linears would never run."""
    from open_clip.modified_resnet import AttentionPool2d

    pools = [name for name, m in modules.items() if isinstance(m, AttentionPool2d)]
    return {name for name in modules for pool in pools if name.startswith(pool + ".")}


def lora_targets(encoder: TrainableEncoder, pattern: str | None) -> list[str]:
    """The exact module names LoRA adapts: those ``pattern`` fully matches, or by default every linear
    layer and every ``nn.MultiheadAttention`` of the vision tower (open_clip's native ViT keeps q, k and v
    in the attention block's ``in_proj_weight``, which only an adapter on the block itself reaches; its
    ``out_proj`` is adapted with the block); a convolutional tower whose linear layers are never called
    (open_clip's ModifiedResNet: its attention pool reads their weights directly) gets its convolutions. An
    empty result, or a target whose adapter would never run, is an error, never a silent no-op."""
    import re

    modules = dict(encoder.weights.named_modules())
    attention = {name for name, m in modules.items() if isinstance(m, torch.nn.MultiheadAttention)}
    never_called = _weights_read_directly(modules)
    if pattern is not None:
        targets = [name for name in modules if name and re.fullmatch(pattern, name)]
        where = f"lora.target_modules {pattern!r}"
        unreachable = [name for name in targets if name in never_called]
        if unreachable:
            raise ConfigError(f"lora.target_modules: {', '.join(unreachable)}: an adapter there would never run "
                              "(open_clip's AttentionPool2d uses these weights directly); target the tower's "
                              "convolutions instead")
    else:
        tower = {name: m for name, m in modules.items() if name.startswith(encoder.tower + ".")}
        targets = [name for name, m in tower.items() if name not in never_called
                   and (name in attention or (isinstance(m, torch.nn.Linear) and name.rpartition(".")[0] not in attention))]
        if not targets:  # a convolutional tower (ModifiedResNet): its convolutions
            targets = [name for name, m in tower.items() if isinstance(m, torch.nn.Conv2d)]
        where = f"the vision tower ({encoder.tower})"
    if not targets:
        raise ConfigError(f"trainable: lora: {where} has no module to adapt in {type(encoder.weights).__name__}")
    return targets


def freeze(encoder: TrainableEncoder, trainable: str, lora: EncoderLora) -> None:
    """Make only the chosen parts trainable: peft's LoRA (which freezes everything else) for ``lora``;
    for a locked tower, open_clip's own lock where it applies, then every parameter of that tower by name."""
    if trainable == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora_targets(encoder, lora.target_modules))
        # the layers are injected in place: encoder.trained keeps its names and now trains the adapters only
        encoder.peft_model = get_peft_model(encoder.weights, config)
    elif trainable != "full":
        open_clip_model = encoder.vision_prefixes[0] == "visual."
        if open_clip_model and trainable == "locked_text":
            encoder.weights.lock_text_tower()
        elif open_clip_model:
            encoder.weights.lock_image_tower()
        # by name: all a transformers CLIP/SigLIP has, and what open_clip's locks leave trainable (an HF text
        # tower's proj: HFTextEncoder.lock freezes the transformer only; a timm tower's head: TimmModel.lock
        # freezes the trunk only). The logit scale (and SigLIP's bias) belongs to neither tower.
        for name, param in encoder.trained.named_parameters():
            vision = encoder.is_vision(name)
            if (trainable == "locked_text" and not vision and "logit" not in name) or (trainable == "locked_vision" and vision):
                param.requires_grad_(False)


def unscalar_parameters(model: torch.nn.Module) -> None:
    """Give 0-dim parameters (open_clip's logit_scale) one dimension: DeepSpeed 0.19 broadcasts
    every parameter as ``p.data.view(torch.uint8)``, which fails on scalars. Values are unchanged;
    checkpoints are written back in the original shapes."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))


# ---------------------------------------------------------------------------------------------
# The trainer


class ClipHardNegTrainer(PairBatches, Trainer):
    """transformers.Trainer with whole-pair batches (and replay items), the pair loss and, with a ``teacher``
    (the frozen base), the distillation term."""

    def __init__(self, *args, loss_config: PairLoss, teacher: torch.nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config, self.teacher = loss_config, teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.loss_config
        image_features, text_features, logit_scale = _features(model(inputs["pixel_values"], inputs["input_ids"]))
        parts = clip_hardneg_loss(image_features, text_features, logit_scale, inputs["text_ids"], inputs["partner"],
                                  config.hardneg_weight, config.image_side_weight, replay=inputs["replay"],
                                  hardneg_label_smoothing=config.hardneg_label_smoothing)
        if self.teacher is not None:
            on = inputs["replay"] if config.distill_on == "replay" else torch.ones_like(inputs["replay"])
            if on.any():
                with torch.no_grad():
                    teacher = _features(self.teacher(inputs["pixel_values"], inputs["input_ids"]))
                parts["distill"] = distill_loss(image_features[on], text_features[on], logit_scale,
                                                teacher[0][on], teacher[1][on], teacher[2])
                parts["loss"] = parts["loss"] + config.distill_weight * parts["distill"]
        return (parts["loss"], parts) if return_outputs else parts["loss"]


def _features(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, text features, logit scale) of an open_clip CLIP (dict or tuple) or ``HFClipForTraining``."""
    return (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) else tuple(out[:3])


# ---------------------------------------------------------------------------------------------
# The recipe


def main(cfg: ClipHardNegConfig, callbacks: Sequence[Any] = ()) -> RunResults:
    """Run the recipe; returns its run record (also in ``<run>/results.json``). ``callbacks``: TrainerCallbacks
    added after the run\'s own (its validation loop, checkpoints, signals)."""
    # data: run directory, pairs, leakage audit
    if cfg.train.activation_checkpointing:
        raise ConfigError("train.activation_checkpointing: not supported by clip_hardneg (CLIP-style encoders train "
                          "without it)")
    if cfg.loss.distill_weight and cfg.loss.distill_on == "replay" and cfg.data.replay == "none":
        raise ConfigError("loss.distill_on: replay needs data.replay (there are no replay items to distill on)")
    run = lifecycle.open_run(RECIPE, cfg, strategy_name(cfg), modes=["clip"])

    # model
    spec = resolve_model(cfg.model)
    if not spec.is_encoder:
        raise ConfigError(f"model: clip_hardneg trains CLIP-style encoders; {cfg.model!r} is {spec.family}")
    spec = replace(spec, clip_prompt="question" if cfg.data.text == "question_option" else "default")
    device = process_device()
    torch.manual_seed(cfg.train.seed)
    backend, spec = load_model(spec, device=device)
    encoder = (open_clip_encoder if spec.family == "open-clip" else hf_clip_encoder)(backend, spec)
    teacher = copy.deepcopy(encoder.trained).eval().requires_grad_(False) if cfg.loss.distill_weight else None
    torch.manual_seed(cfg.train.seed)  # LoRA init must not depend on whether the base model was just built
    freeze(encoder, cfg.trainable, cfg.lora)
    if run.launch["deepspeed"]:
        unscalar_parameters(encoder.weights)
    model = encoder.trained
    vision_trains = any(p.requires_grad for n, p in model.named_parameters() if encoder.is_vision(n))
    text_trains = any(p.requires_grad for n, p in model.named_parameters() if not encoder.is_vision(n) and "logit" not in n)

    cached_at = {"step": 0}  # the optimizer step the training backend's cached embeddings were computed at

    def fresh(scorer, trainer) -> None:
        """Drop the cached embeddings a training step has made stale: those of the towers that train, once
        a step has passed since they were computed. A frozen tower's stay valid for the whole run, and a
        loaded checkpoint's (the test stage's ``best``) never change."""
        step = trainer.state.global_step if trainer is not None else 0
        if scorer is backend and step != cached_at["step"]:
            scorer.clear_cache(images=vision_trains, texts=text_trains)
            cached_at["step"] = step

    def evaluate(bench, mode, scorer=backend, trainer=None):
        with whole_weights(trainer):  # under ZeRO-3, gathered for the pass
            model.eval()
            fresh(scorer, trainer)
            records = predict(scorer, spec, mode, bench, run.prompts, cfg.val_batch_pairs)
            model.train()
        return records, score_records(bench, records, prompt_version=run.prompts.version)

    def retain(rset, scorer=backend, trainer=None):
        with whole_weights(trainer):
            model.eval()
            fresh(scorer, trainer)  # the same images as the pairs' (the world's test split) are encoded once
            records = answer_encoder(scorer, rset, run.prompts.template("clip", spec.clip_prompt))
            model.train()
        return records

    base = lifecycle.score_stage(run, "base", evaluate, spec.name, retain=retain)

    # trainer (the encoder is loaded whole: encoders are small; ZeRO-3 partitions it when training starts)
    width = max(p.shape[-1] for p in model.parameters() if p.dim() == 2)  # for DeepSpeed's auto bucket sizes
    args = TrainingArguments(**trainer_arguments(run, cfg.train, model_width=width), remove_unused_columns=False)
    replay = run.replay_rows(caption_items(run.replay, cfg.data.replay, cfg.data.replay_text,
                                           run.prompts.template("clip", spec.clip_prompt)) if run.replay else [])
    per_batch = run.replay_per_batch
    trainer = ClipHardNegTrainer(model=model, args=args, train_dataset=PairItems(run.train, encoder.preprocess, cfg.data.text, replay),
                                 data_collator=ClipCollator(encoder.tokenize), pairs_per_batch=cfg.train.pairs_per_batch,
                                 replay_items=len(replay), replay_per_batch=per_batch, loss_config=cfg.loss, teacher=teacher)
    callback = lifecycle.validation(run, lambda bench, mode: evaluate(bench, mode, trainer=trainer), encoder.save,
                                    val_mode="clip", saved_parameters=lambda: list(model.parameters()),
                                    retain=lambda rset: retain(rset, trainer=trainer))
    trainer.add_callback(callback)

    # train, then test the selected checkpoint loaded the way `unconfuse eval` loads it
    lifecycle.fit(run, trainer, callbacks)
    best, _ = load_model(replace(spec, build=None, model_id=encoder.model_id(run.best_dir)), device=device)
    final = lifecycle.score_stage(run, "test", lambda bench, mode: evaluate(bench, mode, best), spec.name,
                                  retain=lambda rset: retain(rset, best))
    return lifecycle.finish(run, spec.name, base, final, trainer, callback,
                            details={"loss": to_dict(cfg.loss), "trainable": cfg.trainable,
                                     "replay": {"items": len(replay), "per_batch": per_batch}})


if __name__ == "__main__":
    sys.exit(recipe_cli(RECIPE))
