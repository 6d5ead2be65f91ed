"""Model presets and loading: ``--model`` is a preset name, a local folder, or a hub id."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..home import built_model_dir, config_dir, unconfuse_home
from .base import EncoderBackend, GenerativeBackend, ModelLoadError, Query, Reference

__all__ = ["ModelSpec", "load_model", "model_identity", "resolve_model", "find_preset", "list_presets", "ModelLoadError", "Query",
           "Reference", "GenerativeBackend", "EncoderBackend"]

FAMILIES = ("hf-vlm", "open-clip", "hf-clip", "hf-vision")
CLIP_MODEL_TYPES = {"clip", "siglip", "siglip2", "chinese_clip", "altclip", "metaclip_2"}
VISION_MODEL_TYPES = {"dinov2", "dinov2_with_registers", "dinov3_vit", "vit", "vit_mae"}  # image-only encoders (mining)


def _preset_dir() -> Path:
    return config_dir() / "models"


@dataclass
class ModelSpec:
    """A resolved model: how to load it and how to ask it."""

    name: str
    family: str
    model_id: str | None = None
    pretrained: str | None = None  # open_clip pretrained tag
    build: dict[str, Any] | None = None  # tiny models: builder settings (see eval/world/tiny.py)
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    prompt_key: str = "default"
    system_prompt: str | None = None
    clip_prompt: str = "default"
    max_new_tokens: int = 128  # freeform answers; mc uses the reference's 32
    batch_size: int | None = None
    notes: str | None = None
    architecture: dict[str, Any] | None = None  # real presets: the published config (see architecture.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_encoder(self) -> bool:
        return self.family in ("open-clip", "hf-clip")


def list_presets() -> list[str]:
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def load_preset(path: Path) -> ModelSpec:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data.setdefault("name", path.stem)
    if data.get("family") not in FAMILIES:
        raise ValueError(f"{path}: family must be one of {', '.join(FAMILIES)}, got {data.get('family')!r}")
    if not data.get("model_id") and not data.get("build"):
        raise ValueError(f"{path}: needs model_id or build")
    return ModelSpec(**data)


def _family_of_folder(path: Path) -> str:
    if (path / "adapter_config.json").exists():  # LoRA adapters of an image-text-to-text model (a run's checkpoints/best)
        return "hf-vlm"
    if (path / "open_clip_config.json").exists():
        return "open-clip"
    config = path / "config.json"
    if config.exists():
        model_type = json.loads(config.read_text()).get("model_type", "")
        return _family_of_type(model_type)
    raise ModelLoadError(f"{path}: neither a transformers model (config.json) nor an open_clip one (open_clip_config.json)")


def _family_of_type(model_type: str) -> str:
    if model_type in CLIP_MODEL_TYPES:
        return "hf-clip"
    return "hf-vision" if model_type in VISION_MODEL_TYPES else "hf-vlm"


def _hub_config(model_id: str) -> dict[str, Any]:
    """config.json of a hub model, from the local cache when offline; fails fast with a clear message."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ModelLoadError(f"model {model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                             "forbids downloading it; download it on a connected machine, or use a local folder "
                             f"or a tiny preset ({', '.join(p for p in list_presets() if p.startswith('tiny'))}).")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model_id, "config.json")).read_text())
    except Exception as exc:
        raise ModelLoadError(f"cannot fetch model {model_id!r} from the hub: {exc}. Offline? set HF_HUB_OFFLINE=1 "
                             "and use a cached model or a local folder.") from exc


def find_preset(arg: str) -> ModelSpec | None:
    """The preset ``arg`` names (a name under configs/models, or a preset YAML file), else None."""
    preset = _preset_dir() / f"{arg}.yaml"
    if preset.exists():
        return load_preset(preset)
    if arg.endswith((".yaml", ".yml")) and Path(arg).is_file():
        return load_preset(Path(arg))
    return None


def resolve_model(arg: str) -> ModelSpec:
    """Turn a ``--model`` argument into a spec (no weights are loaded)."""
    preset = find_preset(arg)
    if preset is not None:
        return preset
    if arg.startswith(("hf-hub:", "local-dir:")):
        return ModelSpec(name=arg, family="open-clip", model_id=arg)
    path = Path(arg).expanduser()
    if path.is_dir():
        family = _family_of_folder(path)
        model_id = f"local-dir:{path}" if family == "open-clip" else str(path)
        return ModelSpec(name=path.name, family=family, model_id=model_id)
    if arg.startswith(("./", "../", "/", "~")) or arg in (".", "..") or arg.count("/") > 1:
        # a path, not a hub id (``owner/name``): never sent to the hub
        raise ModelLoadError(f"model path {arg} does not exist" if not path.exists() else
                             f"model path {arg} is not a model folder")
    if "/" in arg and not path.exists():
        model_type = _hub_config(arg).get("model_type", "")
        return ModelSpec(name=arg, family=_family_of_type(model_type), model_id=arg)
    raise ModelLoadError(f"unknown model {arg!r}: not a preset ({', '.join(list_presets())}), not a folder, not a hub id")


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """What names the weights ``spec`` loads, for run fingerprints: its name, the model id (a built
    preset's folder, ``{home}`` expanded) and revision, and for a local folder the sha256 of its small
    files (configs, tokenizers, adapters, tiny weights) and the size of its large ones (hashing a 15 GB
    checkpoint on every run would cost minutes)."""
    import hashlib

    model_id = spec.model_id.replace("{home}", str(unconfuse_home())) if spec.model_id else None
    if spec.build:
        model_id = str(built_model_dir(spec.name))
    identity: dict[str, Any] = {"name": spec.name, "model_id": model_id, "revision": spec.revision, "dtype": spec.dtype}
    folder = Path(model_id.removeprefix("local-dir:")) if model_id else None
    if folder is not None and folder.is_dir():
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            size = path.stat().st_size
            files[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                                                    if size < 64 << 20 else size)
        identity["files"] = files
    return identity


def load_model(arg: str | ModelSpec, device: str | None = None, trust_remote_code: bool | None = None):
    """Load the backend for a model argument or spec. Returns ``(backend, spec)``, the spec's
    ``model_id`` resolved to what was loaded (a built preset's folder, ``{home}`` expanded)."""
    spec = arg if isinstance(arg, ModelSpec) else resolve_model(arg)
    model_id = spec.model_id.replace("{home}", str(unconfuse_home())) if spec.model_id else None
    if spec.build:
        folder = built_model_dir(spec.name)
        if not (folder / ".complete").exists():
            raise ModelLoadError(f"{spec.name} is built from config and is not built in {folder} yet; unconfuse commands "
                                 f"and recipes build it on first use (in Python: unconfuse.eval.world.prepare(models=[{spec.name!r}]))")
        model_id = f"local-dir:{folder}" if spec.family == "open-clip" else str(folder)
    elif model_id and "/" in model_id and not model_id.startswith(("hf-hub:", "local-dir:")) and not Path(model_id).exists():
        _hub_config(model_id)  # fail fast offline, before the slow loaders try
    remote = spec.trust_remote_code if trust_remote_code is None else trust_remote_code
    if spec.family == "hf-vlm":
        from .hf_vlm import HFVisionLanguageBackend, merge_adapters

        model = processor = None
        if model_id and (Path(model_id) / "adapter_config.json").exists():  # adapters: merged into their base
            model, processor = merge_adapters(model_id, dtype=None if spec.dtype == "auto" else spec.dtype)
        backend: Any = HFVisionLanguageBackend(model_id, name=spec.name, dtype=spec.dtype, device=device,
                                               trust_remote_code=remote, system_prompt=spec.system_prompt,
                                               revision=spec.revision, model=model, processor=processor)
    elif spec.family == "open-clip":
        from .clip import OpenClipBackend

        backend = OpenClipBackend(model_id, name=spec.name, pretrained=spec.pretrained, device=device)
    elif spec.family == "hf-vision":
        from .clip import HFVisionBackend

        backend = HFVisionBackend(model_id, name=spec.name, device=device, trust_remote_code=remote, revision=spec.revision)
    else:
        from .clip import HFClipBackend

        backend = HFClipBackend(model_id, name=spec.name, device=device, trust_remote_code=remote,
                                revision=spec.revision)
    return backend, replace(spec, model_id=model_id)
