"""Real models at their real size, with no weights and no hub: each real preset's ``architecture`` block
carries its published config (dimensions, layers, heads, vocabulary, vision settings; ``source`` names
where it was read) and its published parameter count, so ``empty_model`` can build the model's exact
module tree on the meta device (accelerate's ``init_empty_weights``), for memory plans and parameter
counts, or ``materialize_random`` on a GPU with random weights, for the GPU benches."""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from . import ModelLoadError, ModelSpec, resolve_model

__all__ = ["ArchitectureError", "architecture_of", "empty_model", "real_presets", "parameter_count", "image_tokens"]


class ArchitectureError(ModelLoadError):
    """A preset with no (or a malformed) ``architecture`` block."""


def real_presets() -> list[str]:
    """The presets that carry a real model's architecture (the real, hub-backed ones)."""
    from . import list_presets

    return [name for name in list_presets() if resolve_model(name).architecture]


def architecture_of(model: str | ModelSpec) -> dict[str, Any]:
    """The ``architecture`` block of a preset (a name or a spec); an error naming the preset if it has none."""
    spec = resolve_model(model) if isinstance(model, str) else model
    arch = spec.architecture
    if not arch:
        raise ArchitectureError(f"{spec.name}: no architecture block in its preset (configs/models/{spec.name}.yaml); "
                                f"real presets with one: {', '.join(real_presets())}")
    known = {"source", "parameters", "config", "open_clip", "text_config", "image_tokens", "notes"}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ArchitectureError(f"{spec.name}: architecture: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if spec.family == "open-clip" and "open_clip" not in arch or spec.family != "open-clip" and "config" not in arch:
        raise ArchitectureError(f"{spec.name}: architecture needs {'open_clip' if spec.family == 'open-clip' else 'config'}")
    return arch


def image_tokens(model: str | ModelSpec) -> int:
    """Image tokens per image the preset's language model reads (0 for encoders), as its block states."""
    return int(architecture_of(model).get("image_tokens", 0))


@contextmanager
def _bert_folder(text_config: dict[str, Any]) -> Iterator[str]:
    """A folder holding only a transformers config.json: what open_clip's HF text tower reads its
    architecture from (``hf_model_name``), here without the hub."""
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="unconfuse-text-tower-") as folder:
        config = dict(text_config)
        AutoConfig.for_model(config.pop("model_type"), **config).save_pretrained(folder)
        yield folder


def _open_clip_model(arch: dict[str, Any]):
    import open_clip

    model_cfg = arch["open_clip"]
    if isinstance(model_cfg, str):  # one of open_clip's own model configs (ViT-B-16, ViT-L-14, ...)
        named = open_clip.get_model_config(model_cfg)
        if named is None:
            raise ArchitectureError(f"architecture.open_clip: {model_cfg!r} is not an open_clip model config")
        model_cfg = named
    model_cfg = json.loads(json.dumps(model_cfg))  # a copy the text tower can be pointed elsewhere in
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return open_clip.CLIP(**model_cfg)
    if "text_config" not in arch:
        raise ArchitectureError("architecture: an open_clip model with a Hugging Face text tower needs text_config")
    with _bert_folder(arch["text_config"]) as folder:
        text_cfg.update(hf_model_name=folder, hf_tokenizer_name=folder, hf_model_pretrained=False)
        return open_clip.CustomTextCLIP(**model_cfg)


def _transformers_model(spec: ModelSpec, config: dict[str, Any], dtype):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    config = dict(config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    auto = AutoModelForImageTextToText if spec.family == "hf-vlm" else AutoModel
    return auto.from_config(hf_config, dtype=dtype)


def empty_model(model: str | ModelSpec, dtype: str = "bfloat16"):
    """The preset's real architecture as a torch module whose parameters live on the meta device (no memory,
    no weights, no hub): the transformers class the preset loads (image-text-to-text or vision model), or
    open_clip's CLIP / CustomTextCLIP."""
    import torch
    from accelerate import init_empty_weights

    spec = resolve_model(model) if isinstance(model, str) else model
    arch = architecture_of(spec)
    with init_empty_weights():
        if spec.family == "open-clip":
            built = _open_clip_model(arch).to(getattr(torch, dtype))
        else:
            built = _transformers_model(spec, arch["config"], getattr(torch, dtype))
    if spec.family != "open-clip":
        # as loading does (Gemma 3's lm_head is its embedding matrix): from_config leaves them apart, and inside
        # init_empty_weights a tie would register a fresh meta copy
        built.tie_weights()
    return built


def parameter_count(module) -> int:
    """Parameters of a module, each shared tensor once (tied embeddings count once, as the hub counts them)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
