"""clip_hardneg: contrastive fine-tuning of a CLIP-style encoder with confusing pairs as hard negatives.

Each batch holds whole pairs. The loss is CLIP's InfoNCE with identical texts as shared positives,
plus a NegCLIP-style term: each image must prefer its own text over its pair partner's
(``hardneg_weight``), and optionally each text its own image over the partner image
(``image_side_weight``). Both weights 0 is plain CLIP fine-tuning on the same batches: the baseline.

    unconfuse train clip_hardneg --config configs/clip_hardneg/tiny.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m unconfuse.recipes.clip_hardneg --config ...

Skeleton: setup (run directory, data, leakage audit, model, W&B) -> base test score -> train
(transformers.Trainer, validation callback) -> final test score with the selected checkpoint -> save.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from unconfuse.eval.io import atomic_write_json
from unconfuse.eval.models import load_model, resolve_model
from unconfuse.eval.prompts import load_prompts
from unconfuse.eval.scorer import SCORER_VERSION
from unconfuse.train.callbacks import PairValidationCallback, predict, score_records
from unconfuse.train.config import ConfigError, dump_config, to_dict
from unconfuse.train.data import ClipCollator, PairBatchSampler, PairItems
from unconfuse.train.losses import clip_hardneg_loss
from unconfuse.train.run import TrainConfig as BaseTrainConfig
from unconfuse.train.run import (check_leakage, default_output_dir, launch_settings, log_final_to_wandb, recipe_cli,
                                 resolve_data, setup_wandb, trainer_arguments, write_scored)

RECIPE = "clip_hardneg"
TRAINABLE = ("full", "locked_text", "locked_vision", "lora")


@dataclass
class DataConfig:
    train: str = "world:train"  # any benchmark argument, or world:<split> for the embedded world
    val: str = "world:val"
    test: str = "world:test"
    text: str = "option"  # option | question_option | caption: what each image is trained to match


@dataclass
class LossConfig:
    hardneg_weight: float = 1.0  # image vs (own text, partner's text); 0 = plain CLIP fine-tuning
    image_side_weight: float = 0.0  # text vs (own image, partner image)


@dataclass
class LoraSettings:
    """LoRA on the vision tower's attention and MLP linears (``trainable: lora``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = r"visual\..*\.(q_proj|k_proj|v_proj|c_proj|c_fc|out_proj)"


@dataclass
class TrainConfig(BaseTrainConfig):
    max_steps: int = 150
    pairs_per_batch: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 10


@dataclass
class ClipHardNegConfig:
    """Every field can be set in YAML or as ``key=value`` on the command line."""

    model: str = "tiny-clip-base"  # preset, local-dir:/path, hf-hub:org/name, open_clip arch
    strategy: str | None = None  # name for grouping runs (default: hardneg, or clip-ft when both weights are 0)
    output_dir: str | None = None  # default runs/clip_hardneg-<time>
    trainable: str = "full"  # full | locked_text | locked_vision | lora (vision tower)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report_to: str = "wandb"  # wandb | none
    allow_leakage: bool = False
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"
    val_batch_pairs: int = 32


def strategy_name(cfg: ClipHardNegConfig) -> str:
    if cfg.strategy:
        return cfg.strategy
    return "clip-ft" if not (cfg.loss.hardneg_weight or cfg.loss.image_side_weight) else "hardneg"


class ClipHardNegTrainer(Trainer):
    """transformers.Trainer with whole-pair batches and the pair loss."""

    def __init__(self, *args, pairs_per_batch: int, loss_config: LossConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_per_batch = pairs_per_batch
        self.loss_config = loss_config

    def get_train_dataloader(self) -> DataLoader:
        sampler = PairBatchSampler(len(self.train_dataset) // 2, self.pairs_per_batch, seed=self.args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=0)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(inputs["pixel_values"], inputs["input_ids"])
        image_features, text_features, logit_scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
            if isinstance(out, dict) else out[:3]
        parts = clip_hardneg_loss(image_features, text_features, logit_scale, inputs["text_ids"], inputs["partner"],
                                  self.loss_config.hardneg_weight, self.loss_config.image_side_weight)
        return (parts["loss"], parts) if return_outputs else parts["loss"]


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


@dataclass
class Encoder:
    """What the recipe needs from a model family: the module to train, how to feed it, which
    parameters are the vision tower, and how to save a checkpoint that ``unconfuse eval`` loads."""

    trained: torch.nn.Module  # forward(pixel_values, text) -> (image features, text features, scale)
    weights: torch.nn.Module  # the model whose weights are saved (open_clip CLIP / transformers CLIPModel)
    preprocess: Any  # PIL image -> pixel tensor
    tokenize: Any  # list[str] -> tensor, or dict of tensors
    vision_prefixes: tuple[str, ...]
    save: Any  # (folder) -> None
    model_id: Any  # (folder) -> model argument for load_model

    def is_vision(self, name: str) -> bool:
        return name.startswith(self.vision_prefixes)


def open_clip_encoder(adapter, spec) -> Encoder:
    import open_clip

    model_id = _materialized_id(spec)
    if model_id.startswith("local-dir:"):
        config = json.loads((Path(model_id[len("local-dir:"):]) / "open_clip_config.json").read_text())
    elif model_id.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(model_id[len("hf-hub:"):], "open_clip_config.json")).read_text())
    else:  # an open_clip architecture name with a pretrained tag
        config = {"model_cfg": open_clip.get_model_config(model_id),
                  "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    shapes = {k: v.shape for k, v in adapter.model.state_dict().items()}

    def save(folder: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.to("cpu").reshape(shapes[k]).contiguous() for k, v in export_state(adapter.model).items()}
        with _atomic_folder(folder) as tmp:
            (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
            save_file(state, str(tmp / "open_clip_model.safetensors"))

    return Encoder(adapter.model, adapter.model, adapter.preprocess, adapter.tokenizer, ("visual.",), save,
                   lambda folder: f"local-dir:{folder}")


def hf_clip_encoder(adapter, spec) -> Encoder:
    processor = adapter.processor
    shapes = {k: v.shape for k, v in adapter.model.state_dict().items()}

    def preprocess(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(processor(text=texts, return_tensors="pt", padding=adapter.text_padding, truncation=True))

    def save(folder: Path) -> None:
        state = {k: v.to("cpu").reshape(shapes[k]).contiguous() for k, v in export_state(adapter.model).items()}
        with _atomic_folder(folder) as tmp:
            adapter.model.save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)

    return Encoder(HFClipForTraining(adapter.model), adapter.model, preprocess, tokenize,
                   ("clip.vision_model.", "clip.visual_projection", "vision_model.", "visual_projection"), save, str)


class _atomic_folder:
    """Write a folder's files into a sibling temp folder, then swap it in."""

    def __init__(self, folder: Path):
        self.folder, self.tmp = folder, folder.with_name(folder.name + ".tmp")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.tmp, self.folder)


def unscalar_parameters(model: torch.nn.Module) -> None:
    """Give 0-dim parameters (open_clip's logit_scale) one dimension: DeepSpeed 0.19 broadcasts
    every parameter as ``p.data.view(torch.uint8)``, which fails on scalars. Values are unchanged;
    checkpoints are written back in the original shapes."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))


def freeze(encoder: Encoder, trainable: str, lora: LoraSettings) -> None:
    """Make only the chosen parts of ``encoder.trained`` trainable (LoRA layers are added in place)."""
    if trainable not in TRAINABLE:
        raise ConfigError(f"trainable: must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if trainable == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora.target_modules if encoder.vision_prefixes[0] == "visual." else HF_LORA_TARGETS
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        inject_adapter_in_model(config, encoder.weights)  # freezes everything but the LoRA weights
        return
    for name, param in encoder.trained.named_parameters():
        vision = encoder.is_vision(name)
        if (trainable == "locked_text" and not vision and "logit" not in name) or (trainable == "locked_vision" and vision):
            param.requires_grad_(False)


HF_LORA_TARGETS = r".*vision_model\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def export_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their open_clip names, LoRA merged into the base layers."""
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in lora_layers:
        layer.merge()
    try:
        state = {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    finally:
        for layer in lora_layers:
            layer.unmerge()
    return state


def main(cfg: ClipHardNegConfig) -> dict[str, Any]:
    """Run the recipe; returns the run's results.json content."""
    start = time.time()
    launch = launch_settings()

    # -- setup ----------------------------------------------------------------------------------
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(RECIPE)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0  # set by torchrun/accelerate for every process
    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
    train_bench, val_bench, test_bench = (resolve_data(a) for a in (cfg.data.train, cfg.data.val, cfg.data.test))
    check_leakage(run_dir, train_bench, {"val": val_bench, "test": test_bench}, cfg.allow_leakage)
    spec = resolve_model(cfg.model)
    if not spec.is_encoder:
        raise ConfigError(f"model: clip_hardneg trains CLIP-style encoders; {cfg.model!r} is {spec.family}")
    spec = replace(spec, clip_prompt="question" if cfg.data.text == "question_option" else "default")
    torch.manual_seed(cfg.train.seed)
    adapter, spec = load_model(spec, device="cuda" if torch.cuda.is_available() else "cpu")
    encoder = (open_clip_encoder if spec.family == "open-clip" else hf_clip_encoder)(adapter, spec)
    torch.manual_seed(cfg.train.seed)  # LoRA init must not depend on whether the base model was just built
    freeze(encoder, cfg.trainable, cfg.lora)
    if launch["deepspeed"]:
        unscalar_parameters(encoder.weights)
    model = encoder.trained
    prompts = load_prompts()
    tags = [RECIPE, spec.name, cfg.data.train]
    wandb_run = setup_wandb(cfg.report_to, run_dir, to_dict(cfg), strategy_name(cfg), tags) if is_main else None
    train_items = PairItems(train_bench, encoder.preprocess, cfg.data.text)

    vision_trains = any(p.requires_grad for n, p in model.named_parameters() if encoder.is_vision(n))
    text_trains = any(p.requires_grad for n, p in model.named_parameters() if not encoder.is_vision(n) and "logit" not in n)

    def evaluate(bench, scorer_adapter=adapter) -> tuple[list[dict], dict[str, Any]]:
        model.eval()
        # embeddings of a frozen tower stay valid between evaluations: only recompute what trains
        if vision_trains or scorer_adapter is not adapter:
            scorer_adapter._image_emb.clear()
        if text_trains or scorer_adapter is not adapter:
            scorer_adapter._text_emb.clear()
        records = predict(scorer_adapter, spec, "clip", bench, prompts, cfg.val_batch_pairs)
        model.train()
        return records, score_records(bench, records, prompt_version=prompts.version)

    def write_test(name: str, records, results) -> None:
        if is_main:
            write_scored(run_dir, name, records, results, title=f"{RECIPE} {name}: {spec.name}")

    # -- base score (the test split is scored, never used for selection) -----------------------
    base_path = run_dir / "base" / "results.json"
    if base_path.exists():
        base = json.loads(base_path.read_text())
    else:
        records, base = evaluate(test_bench)
        write_test("base", records, base)

    # -- train ----------------------------------------------------------------------------------
    best_dir = run_dir / "checkpoints" / "best"

    def save_best(step: int) -> None:
        if is_main:
            encoder.save(best_dir)
            (best_dir / "step.txt").write_text(str(step))

    callback = PairValidationCallback(run_dir, lambda: evaluate(val_bench)[1], save_best, cfg.train.eval_steps,
                                      cfg.train.patience, is_main=is_main,
                                      log=(lambda row: wandb_run.log(row)) if wandb_run else None)
    args = TrainingArguments(**trainer_arguments(cfg.train, run_dir, wandb_run is not None, launch), remove_unused_columns=False)
    trainer = ClipHardNegTrainer(model=model, args=args, train_dataset=train_items,
                                 data_collator=ClipCollator(encoder.tokenize), callbacks=[callback],
                                 pairs_per_batch=cfg.train.pairs_per_batch, loss_config=cfg.loss)
    resume = cfg.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.accelerator.wait_for_everyone()  # rank 0 may still be writing the best weights

    # -- final test score with the selected checkpoint, loaded the way `unconfuse eval` loads it --
    best_adapter, _ = load_model(replace(spec, build=None, model_id=encoder.model_id(best_dir)),
                                 device="cuda" if torch.cuda.is_available() else "cpu")
    records, final = evaluate(test_bench, best_adapter)
    write_test("test", records, final)
    results = {"recipe": RECIPE, "strategy": strategy_name(cfg), "model": spec.name, "data": cfg.data.train,
               "seed": cfg.train.seed, "base": base, "final": final, "best_step": callback.state.best_step,
               "best_val": callback.state.best, "steps": trainer.state.global_step,
               "wall_time_s": time.time() - start, "scorer_version": SCORER_VERSION, "prompt_version": prompts.version,
               "loss": to_dict(cfg.loss), "trainable": cfg.trainable,
               "test_data": cfg.data.test, "base_dir": "base", "test_dir": "test"}
    if is_main:
        atomic_write_json(run_dir / "results.json", results)
        log_final_to_wandb(wandb_run, results, run_dir / "test" / "predictions.jsonl")
    return results


def _materialized_id(spec) -> str:
    """The model id after tiny presets are built (their folder), for reading the open_clip config."""
    if spec.build:
        from unconfuse.eval.models.tiny import materialize
        from unconfuse.eval.pairs import unconfuse_home

        return f"local-dir:{materialize(spec.name, spec.build, unconfuse_home() / 'models')}"
    return spec.model_id


CONFIG_CLASS = ClipHardNegConfig


def summary(results: dict[str, Any]) -> str:
    """One JSON line: strategy, best step, base and final test set accuracy and confusion."""
    return json.dumps({k: results[k] for k in ("strategy", "best_step", "steps")}
                      | {f"{n}_{m}": results[n][m] for n in ("base", "final") for m in ("set_accuracy", "confusion")})


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(RECIPE, summary, argv)


if __name__ == "__main__":
    sys.exit(cli())
