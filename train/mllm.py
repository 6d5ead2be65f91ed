"""What the MLLM recipes share: their data and LoRA settings, the letter examples, loading the model
with LoRA placed per part, scoring (with the image cache kept honest), and adapter merging."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from unconfuse.train.callbacks import predict, score_records
from unconfuse.train.config import ConfigError, setting

# Where image-text-to-text architectures keep their parts (module-name suffixes): LLaVA, LLaVA-NeXT and
# Gemma 3 have a multi_modal_projector beside a vision_tower; Qwen2/2.5-VL keep the projector (merger)
# inside their tower, `visual`.
LANGUAGE_MODELS = ("language_model",)
PROJECTORS = ("multi_modal_projector", "visual.merger")
VISION_TOWERS = ("vision_tower", "visual")
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

EvalMode = Literal["greedy", "prefix", "mc"]
Part = Literal["none", "lora", "full"]


@dataclass
class MllmData:
    """The pairs and how each image becomes an example."""

    train: str = setting("world:train", "training pairs: any benchmark argument (folder, file, hf:<id>, world:<split>)")
    val: str = setting("world:val", "validation pairs: select the checkpoint (never the test pairs)")
    test: str = setting("world:test", "test pairs: scored before and after training, never for selection")
    prompt_mode: Literal["greedy", "mc"] = setting("greedy", "whose prompt the examples use (the eval prompt of that mode)")
    answer_with_option: bool = setting(False, "reply 'A: <option text>' instead of 'A'")
    swap_options: bool = setting(True, "present the options swapped (answers flipped) for half of the pairs, so no "
                                       "letter prior can be learned")


@dataclass
class MllmLora:
    """LoRA on the language model; the projector and the vision tower optionally."""

    r: int = setting(16, "LoRA rank", min=1)
    alpha: int = setting(32, "LoRA alpha (scale = alpha / r)", min=1)
    dropout: float = setting(0.05, "LoRA dropout", min=0)
    projector: Part = setting("none", "the multimodal projector: frozen, LoRA, or trained in full")
    vision: Part = setting("none", "the vision tower: frozen, LoRA, or trained in full")


@dataclass
class Placement:
    """Where LoRA adapters go and what trains in full, as exact module names of one model."""

    lora: dict[str, list[str]]  # part -> linear layers adapted
    full: list[str]  # modules trained in full (peft modules_to_save)


def _find(model, suffixes: tuple[str, ...]) -> str | None:
    """The outermost module whose name ends with one of ``suffixes`` (whole name components)."""
    names = [name for name, _ in model.named_modules() if any(name == s or name.endswith("." + s) for s in suffixes)]
    return min(names, key=len) if names else None


def lora_placement(model, settings: MllmLora) -> Placement:
    """LoRA on the language model's attention and MLP projections, plus the parts ``settings`` asks
    for, located on this architecture. A setting the architecture cannot take (no such part, a
    projector without linear layers, a projector inside a fully trained tower) is a ConfigError
    that names the architecture, never a silent no-op."""
    import torch

    arch = getattr(model.config, "model_type", type(model).__name__)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    parts = {"language model": _find(model, LANGUAGE_MODELS), "projector": _find(model, PROJECTORS),
             "vision": _find(model, VISION_TOWERS)}
    if parts["language model"] is None:
        raise ConfigError(f"{arch}: no language_model module found; LoRA cannot be placed on this architecture")

    def under(part: str) -> list[str]:
        return [n for n in linears if n.startswith(parts[part] + ".")]

    projector = parts["projector"]
    inside_tower = projector is not None and parts["vision"] is not None and projector.startswith(parts["vision"] + ".")
    lora = {"language model": [n for n in under("language model") if n.rpartition(".")[2] in LM_LINEARS]}
    full: list[str] = []
    for part in ("projector", "vision"):
        choice = getattr(settings, part)
        if choice != "none" and parts[part] is None:
            raise ConfigError(f"lora.{part}: {choice}: {arch} has no {part} module ({' or '.join(PROJECTORS if part == 'projector' else VISION_TOWERS)})")
        if choice == "lora":
            lora[part] = [n for n in under(part) if not (part == "vision" and projector and n.startswith(projector + "."))]
            if not lora[part]:
                raise ConfigError(f"lora.{part}: lora cannot apply to {arch}: {parts[part]} has no linear layer "
                                  f"(use full or none)")
        elif choice == "full":
            full.append(parts[part])
    if inside_tower and settings.vision == "full" and settings.projector != "full":
        raise ConfigError(f"lora.vision: full also trains {arch}'s projector ({projector} lives in {parts['vision']}): "
                          f"set lora.projector: full too")
    if inside_tower and settings.vision == "full":
        full.remove(projector)  # trained as part of the tower
    if not lora["language model"]:
        raise ConfigError(f"{arch}: its language model has none of {', '.join(LM_LINEARS)}")
    return Placement(lora, full)


def lora_config(model, settings: MllmLora):
    """The peft LoraConfig of ``lora_placement``: adapters on exactly the named linear layers."""
    import re

    from peft import LoraConfig

    placement = lora_placement(model, settings)
    targets = [name for names in placement.lora.values() for name in names]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules="(" + "|".join(re.escape(t) for t in targets) + ")",
                      modules_to_save=placement.full or None, task_type="CAUSAL_LM")


def load_mllm(run, recipe: str):
    """The run's image-text-to-text model on this process's device, seeded: ``(adapter, spec)``."""
    from unconfuse.eval.models import load_model, resolve_model

    spec = resolve_model(run.cfg.model)
    if spec.family != "hf-vlm":
        raise ConfigError(f"model: {recipe} trains image-text-to-text models; {run.cfg.model!r} is {spec.family}")
    from unconfuse.train.run import process_device

    torch.manual_seed(run.cfg.train.seed)
    return load_model(spec, device=process_device())


def attach_lora(adapter, settings: MllmLora, seed: int):
    """The model with LoRA adapters; the adapter (scorer) keeps seeing it (the layers live in its base model)."""
    from peft import get_peft_model

    config = lora_config(adapter.model, settings)
    torch.manual_seed(seed)  # LoRA init must not depend on whether the base model was just built
    model = get_peft_model(adapter.model, config)
    adapter.model = model.get_base_model()
    return model


def scorer(run, spec, vision_trains: bool):
    """``evaluate(bench, mode, adapter)`` for the lifecycle: the eval code path on ``adapter``. Cached
    image features are dropped when the vision side trains (they would be stale)."""
    def evaluate(bench, mode: str, adapter):
        adapter.model.eval()
        if vision_trains:
            adapter.clear_cache()
        records = predict(adapter, spec, mode, bench, run.prompts, run.cfg.val_batch_pairs)
        adapter.model.train()
        return records, score_records(bench, records, prompt_version=run.prompts.version)

    return evaluate


def merged_best(run, spec, base_path: str):
    """The selected adapters (``checkpoints/best``) merged into the base, as ``unconfuse merge`` writes
    it, behind the eval adapter."""
    from unconfuse.eval.models.hf_vlm import HFVisionLanguageAdapter
    from unconfuse.train.run import process_device

    merged, processor = merge_adapters(run.best_dir, base_path)
    return HFVisionLanguageAdapter(base_path, name=spec.name, model=merged, processor=processor,
                                   device=process_device(), system_prompt=spec.system_prompt)


def merge_adapters(adapter_dir: Path, base: str | None = None):
    """The base model with the LoRA adapters of ``adapter_dir`` merged in (peft's merge_and_unload),
    and its processor."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = AutoModelForImageTextToText.from_pretrained(base, use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    processor = AutoProcessor.from_pretrained(str(adapter_dir) if (adapter_dir / "processor_config.json").exists() else base)
    return model, processor


def letter_examples(bench, prompts, cfg: MllmData, seed: int) -> list[dict[str, Any]]:
    """Per image, in pair order (items 2k, 2k+1): the image, the prompt as presented (options swapped
    with the answer for half of the pairs when ``swap_options``) and the correct and other replies."""
    from unconfuse.eval.images import load_image

    rng = np.random.default_rng(seed)
    images: dict[str, Any] = {}
    examples = []
    for pair in bench.pairs:
        swap = cfg.swap_options and bool(rng.random() < 0.5)
        options = (pair.option_b, pair.option_a) if swap else pair.options
        prompt = prompts.render(cfg.prompt_mode, pair.question, options)

        def reply(letter: str) -> str:
            return f"{letter}: {options['AB'.index(letter)]}" if cfg.answer_with_option else letter

        for side in (1, 2):
            ref = pair.image(side)
            if ref not in images:
                images[ref] = load_image(bench.resolve_image(ref))
            correct = pair.answer(side)
            if swap:
                correct = "B" if correct == "A" else "A"
            other = "B" if correct == "A" else "A"
            examples.append({"image": images[ref], "prompt": prompt, "correct": reply(correct), "other": reply(other)})
    return examples
