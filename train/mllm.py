"""What the MLLM recipes share: LoRA placement, whole-pair batches for TRL trainers, adapter merging."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from unconfuse.train.config import ConfigError
from unconfuse.train.data import PairBatchSampler

# LoRA targets by part, as regexes over module names (LLaVA / Qwen2-VL / Gemma3 naming)
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r".*(multi_modal_projector\.linear_\d|merger\.mlp\.\d|mm_input_projection)"
VISION_TARGETS = r".*(vision_tower|visual\.blocks).*\.(q_proj|k_proj|v_proj|out_proj|qkv|proj|fc1|fc2)"


@dataclass
class LoraSettings:
    """LoRA on the language model by default; the projector and the vision tower optionally."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    projector: str = "none"  # none | lora | full: also adapt the multimodal projector
    vision: str = "none"  # none | lora | full: also adapt the vision tower


class PairBatches:
    """Mixin for TRL trainers: batches of whole pairs (dataset rows 2k and 2k+1 are a pair's two images)."""

    def __init__(self, *args, pairs_per_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_per_batch = pairs_per_batch

    def get_train_dataloader(self) -> DataLoader:
        sampler = PairBatchSampler(len(self.train_dataset) // 2, self.pairs_per_batch, seed=self.args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=0)
        return self.accelerator.prepare(loader)


def lora_config(settings: LoraSettings):
    """LoRA on the language model's attention and MLP projections, plus the parts asked for."""
    from peft import LoraConfig

    for part in ("projector", "vision"):
        if getattr(settings, part) not in ("none", "lora", "full"):
            raise ConfigError(f"lora.{part}: must be none, lora or full, got {getattr(settings, part)!r}")
    targets = [LM_TARGETS]
    if settings.projector == "lora":
        targets.append(PROJECTOR_TARGETS)
    if settings.vision == "lora":
        targets.append(VISION_TARGETS)
    trainable = [name for part, name in (("projector", "multi_modal_projector"), ("vision", "vision_tower"))
                 if getattr(settings, part) == "full"]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules="(" + "|".join(targets) + ")$", modules_to_save=trainable or None,
                      task_type="CAUSAL_LM")


def merge_adapters(adapter_dir: Path, base: str | None = None):
    """The base model with the LoRA adapters of ``adapter_dir`` merged in, and its processor."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = AutoModelForImageTextToText.from_pretrained(base, use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    processor = AutoProcessor.from_pretrained(str(adapter_dir) if (adapter_dir / "processor_config.json").exists() else base)
    return model, processor
