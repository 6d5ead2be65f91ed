"""Recipe configs: typed dataclasses from YAML, with dotted ``key=value`` overrides.

Every field documents itself, TRL-style: ``field(default=..., metadata={"help": ...})``, optionally
with a range (``"min"``: at least, ``"gt"``: above). Unknown keys, wrong types, values outside a
``Literal`` or a range, and non-finite numbers are errors that name the key (``train.lr: unknown
key``), raised at load, before any model loads. ``describe`` renders the help for ``--help``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from unconfuse.eval.home import config_dir

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown or has the wrong type; the message names it."""


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    if not issubclass(cls, Settings):  # a Settings section checks its ranges itself when built
        for f in dataclasses.fields(cls):
            if f.name in kwargs:
                _check_range(kwargs[f.name], f.metadata, f"{prefix}{f.name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # raised by Settings.__post_init__, which names the key without its section
        raise ConfigError(f"{prefix}{exc}") from None


def _check_range(value: Any, metadata: Any, key: str) -> None:
    if value is None:
        return
    if "min" in metadata and value < metadata["min"]:
        raise ConfigError(f"{key}: must be at least {metadata['min']}, got {value!r}")
    if "gt" in metadata and not value > metadata["gt"]:
        raise ConfigError(f"{key}: must be above {metadata['gt']}, got {value!r}")


def describe(config: Any, prefix: str = "") -> str:
    """Every field of a config class (or instance) with its type, default and help, one per line (``--help``)."""
    instance = config() if isinstance(config, type) else config
    hints = typing.get_type_hints(type(instance))
    lines = []
    for f in dataclasses.fields(instance):
        key, kind, text, value = f"{prefix}{f.name}", hints[f.name], f.metadata.get("help", ""), getattr(instance, f.name)
        if dataclasses.is_dataclass(kind):
            lines += [f"{key}.*: {text}", describe(value, prefix=f"{key}.")]
            continue
        bounds = "".join(f", {'>=' if k == 'min' else '>'} {f.metadata[k]}" for k in ("min", "gt") if k in f.metadata)
        lines.append(f"{'  ' if prefix else ''}{key} ({_type_name(kind)}{bounds}; default {value!r}): {text}")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=3`` sets data["a"]["b"] = 3 (values parsed as YAML: numbers, booleans, lists)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item}: the value is not valid YAML (quote it)") from None
    return data


def _merge(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over ``defaults``, mapping by mapping: a YAML that sets ``train.max_steps`` keeps the
    recipe's other ``train.*`` defaults (which differ per recipe)."""
    merged = dict(defaults)
    for key, value in data.items():
        merged[key] = _merge(defaults[key], value) if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value
    return merged


def resolve_config(arg: str | Path) -> Path:
    """A ``--config`` value as a file: a path that exists, else a name of the shipped configs (``mllm_sft/tiny``,
    ``.yaml`` optional), looked up as model presets are; else the path as given (its error names it)."""
    path = Path(arg)
    if path.exists() or path.is_absolute():
        return path
    shipped = config_dir() / (str(arg) if str(arg).endswith((".yaml", ".yml")) else f"{arg}.yaml")
    if shipped.is_file():
        return shipped
    near = sorted(p.relative_to(config_dir()).with_suffix("").as_posix() for p in shipped.parent.glob("*.yaml"))
    raise ConfigError(f"{arg}: no such file, nor a shipped config" + (f" (shipped here: {', '.join(near)})" if near else ""))


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """The recipe config: defaults of ``cls``, then the YAML file (a path, or a shipped config's name:
    ``resolve_config``), then the overrides."""
    data: dict[str, Any] = {}
    overrides = list(overrides or [])
    if path:
        path = resolve_config(path)
        data = read_yaml(path)
        data = {} if data is None else data  # an empty file sets nothing
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top")
    data = apply_overrides(_merge(to_dict(cls()), data), overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:  # blame the override that set the key, else the file
        key = str(exc).split(":", 1)[0]
        override = next((o for o in reversed(overrides) if o.split("=", 1)[0].strip() == key), None)
        raise ConfigError(f"override {override}: {exc}" if override else f"{path or 'config'}: {exc}") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing file, a folder or a YAML syntax error is a ConfigError naming the file
    (and the line and column of the error)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def dump_config(config: Any, path: str | Path) -> None:
    from unconfuse.eval.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


class Settings:
    """Base of every config section: building one in Python runs the checks a YAML file gets (types, ``Literal``
    choices, ranges), so ``TrainSettings(max_steps=0)`` is a ConfigError naming ``max_steps`` like ``train.max_steps=0``
    is. Values are normalised as from YAML (an int where a float is expected becomes a float)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                continue  # a section: checked when it was built
            converted = _convert(value, hints[f.name], f.name)
            _check_range(converted, f.metadata, f.name)
            if converted is not value:
                object.__setattr__(self, f.name, converted)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **bounds: Any) -> Any:
    """A documented config field: ``field(default=..., metadata={"help": ..., "min"/"gt": ...})``."""
    metadata = {"help": help, **bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class RecipeSettings(Settings):
    """The run-level settings every recipe's config has (each config subclasses this and redefines ``model``
    with its own default; its own sections follow these in ``--help`` and config.yaml)."""

    model: str = setting("", "preset, local folder or hub id of the model to train")
    strategy: str | None = setting(None, "name that groups runs in compare and W&B (default: the recipe's)")
    output_dir: str | None = setting(None, "the run directory (default runs/<recipe>-<time>)")
    report_to: Literal["wandb", "none"] = setting("wandb", "W&B logging (offline without an API key)")
    allow_leakage: bool = setting(False, "train even when training images appear in the val/test pairs")
    allow_toy_data: bool = setting(False, "let a real model (not a tiny preset) train or test on the embedded "
                                          "world's 64-px images")
    resume_from_checkpoint: str = setting("auto", "auto: a rerun of this run (same output_dir and fingerprint) resumes "
                                                  "from its newest complete checkpoint, a finished one only prints its "
                                                  "summary (--force starts afresh); latest: the same; or a checkpoint folder")
    force: bool = setting(False, "start afresh in an output_dir that holds another run (its contents are moved "
                                 "aside, not deleted); without it such a run is refused")


@dataclass
class TrainSettings(Settings):
    """The training settings every recipe has (``train.*``); a recipe picks its own defaults."""

    max_steps: int = setting(100, "optimizer steps to train", min=1)
    pairs_per_batch: int = setting(4, "confusing pairs per device batch; a batch holds both images of each pair", min=1)
    learning_rate: float = setting(2e-4, "peak learning rate", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = setting(5, "linear warmup steps", min=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = setting(
        "cosine", "learning-rate schedule after warmup")
    gradient_accumulation_steps: int = setting(1, "batches accumulated per optimizer step", min=1)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", gt=0)
    eval_steps: int = setting(25, "validation cadence in steps (also at step 0 and the last step)", min=1)
    save_steps: int = setting(50, "resumable Trainer checkpoint cadence in steps", min=1)
    save_total_limit: int = setting(2, "resumable checkpoints kept (the newest; checkpoints/best, the selected "
                                       "weights, is kept apart and always)", min=1)
    logging_steps: int = setting(10, "training log cadence in steps", min=1)
    patience: int = setting(0, "stop after this many validations without improvement; 0 = never", min=0)
    selection: Literal["set_accuracy", "set_accuracy_with_retention_floor", "last"] = setting(
        "set_accuracy", "how the validation loop picks the best checkpoint: set accuracy (ties: lower confusion); "
                        "that among checkpoints whose validation-side retention stays within retention_floor of the "
                        "base's; or last: the last one validated (no selection, for studies of training length)")
    retention_floor: float = setting(5.0, "with selection set_accuracy_with_retention_floor: the largest retention drop "
                                          "(points, validation side) a selected checkpoint may have", min=0)
    seed: int = setting(0, "seed of the model init, LoRA init, batch order and augmentation")
    bf16: bool = setting(False, "train in bfloat16 mixed precision (GPUs that support it)")
    activation_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory "
                                                    "(MLLMs; transformers' name for gradient checkpointing)")
