"""``unconfuse plan``: the GPU memory a recipe's config needs, from the model's real architecture built on the
meta device (no weights, no hub) and the launch's process count and ZeRO stage, before anyone books GPUs.

Where the memory goes, per GPU:

- weights: every parameter in the training dtype (bf16 with ``train.bf16``); frozen ones are sharded only
  under ZeRO-3. peft's ``modules_to_save`` (parts trained in full) are a second copy beside the frozen original.
- gradients and optimizer state of the trainable parameters: DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``: 18 bytes per trainable
  parameter for mixed-precision Adam (16- and 32-bit gradients, 32-bit master weights, two moments) sharded over
  the processes under ZeRO; plain DDP or one process is ZeRO-2 on one GPU), the trainable weights' own 2 bytes
  counted under weights.
- activations of one device batch: what autograd keeps through one decoder layer of the language model as the
  recipe trains it, measured on the CPU at the real width (``_decoder_layer_bytes``: saved-tensor hooks under bf16
  autocast; the norms' float32 upcasts, each LoRA branch's own copy of its input, dropout masks all show up), times
  the layers, plus the loss: TRL's fused LM head on the answer tokens (``_fused_head_bytes``: no
  ``[tokens, vocab]`` logits). With activation checkpointing only each layer's input is kept, and one layer is
  recomputed at a time. The vision tower keeps activations only when it trains (counted: about 16
  x width per token and block). ``bench/gpu_scale.py`` compares the whole with a GPU's measured peak.
- scoring: the recipes score val and test with the whole model on every GPU (ZeRO-3 gathers it), beside the
  training state, with a small batch of forward-only activations.
- a fixed allowance for the CUDA context and the allocator's slack (``OVERHEAD_BYTES`` + 10%).

The verdict per GPU size: fits under the launch as given (and with how much to spare), or the fewest GPUs
over which ZeRO-3 would fit it, or that one device batch's activations alone do not fit.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unconfuse.eval.models import ModelSpec, resolve_model
from unconfuse.eval.models.architecture import architecture_of, empty_model, image_tokens, parameter_count
from unconfuse.train.config import ConfigError

GiB = 1024 ** 3
OVERHEAD_BYTES = int(1.5 * GiB)  # CUDA context, NCCL buffers, cuBLAS workspace
GPU_SIZES_GB = (24, 40, 80, 141)
PROMPT_TEXT_TOKENS = 96  # chat template, question and two lettered options of a MediConfusion item
ANSWER_TOKENS = 4  # a letter and the end of turn (sft/dpo), grpo's max_completion_length otherwise


@dataclass
class Launch:
    """How a run is spread: processes in all, and the DeepSpeed ZeRO stage (0: DDP or a single process)."""

    processes: int = 1
    zero_stage: int = 0
    name: str = "one process"


def read_launch(path: str | None) -> Launch:
    """Processes and ZeRO stage of an accelerate config YAML (its DeepSpeed JSON file or inline
    ``zero_stage``), read with accelerate's own config loader; no file: one process."""
    if not path:
        return Launch()
    from accelerate.commands.config.config_args import load_config_from_file

    if not Path(path).is_file():
        raise ConfigError(f"--launch {path}: no such accelerate config file")
    try:
        cfg = load_config_from_file(path)
    except Exception as exc:  # accelerate raises bare errors on malformed files
        raise ConfigError(f"--launch {path}: not an accelerate config: {exc}") from None
    processes = max(1, int(cfg.num_processes or 1))
    stage = 0
    if str(cfg.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED"):
        ds = cfg.deepspeed_config or {}
        if ds.get("deepspeed_config_file"):
            file = Path(ds["deepspeed_config_file"])
            if not file.is_file():
                raise ConfigError(f"--launch {path}: deepspeed_config_file {file} does not exist")
            stage = int(json.loads(file.read_text()).get("zero_optimization", {}).get("stage", 0))
        else:
            stage = int(ds.get("zero_stage", 0))
    return Launch(processes, stage, f"{Path(path).name}: {processes} process(es)" + (f", ZeRO-{stage}" if stage else ""))


@dataclass
class Plan:
    """The memory plan of one recipe config under one launch (bytes per GPU)."""

    recipe: str
    model: str
    launch: Launch
    parameters: int
    parts: dict[str, dict[str, int]]  # part -> {"total", "trainable"}
    trainable: int
    weights: int
    gradients_and_optimizer: int
    activations: dict[str, int]  # "checkpointing on" / "checkpointing off"
    activation_checkpointing: bool
    scoring: int
    sequence: dict[str, int]
    verdicts: dict[str, str] = field(default_factory=dict)

    @property
    def training_peak(self) -> int:
        used = self.activations["on" if self.activation_checkpointing else "off"]
        return self._with_overhead(self.weights + self.gradients_and_optimizer + used)

    @property
    def scoring_peak(self) -> int:
        return self._with_overhead(self.weights + self.gradients_and_optimizer + self.scoring)

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.scoring_peak)

    @staticmethod
    def _with_overhead(used: int) -> int:
        return int(used * 1.1) + OVERHEAD_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "model": self.model, "launch": vars(self.launch), "parameters": self.parameters,
                "trainable": self.trainable, "parts": self.parts, "per_gpu_bytes": {
                    "weights": self.weights, "gradients_and_optimizer": self.gradients_and_optimizer,
                    "activations_checkpointing_on": self.activations["on"],
                    "activations_checkpointing_off": self.activations["off"], "scoring": self.scoring,
                    "overhead": OVERHEAD_BYTES, "training_peak": self.training_peak, "scoring_peak": self.scoring_peak,
                    "peak": self.peak}, "activation_checkpointing": self.activation_checkpointing,
                "sequence": self.sequence, "verdicts": self.verdicts}


def _parts_of(model, spec: ModelSpec, cfg) -> dict[str, str]:
    """Part name -> module prefix: the language model, projector and vision tower of an MLLM (as the recipes
    find them), the two towers of an encoder."""
    if spec.family == "hf-vlm":
        from unconfuse.train.mllm import LANGUAGE_MODELS, PROJECTORS, VISION_TOWERS, _find

        found = {"language model": _find(model, LANGUAGE_MODELS), "projector": _find(model, PROJECTORS),
                 "vision tower": _find(model, VISION_TOWERS)}
        return {part: prefix for part, prefix in found.items() if prefix}
    if spec.family == "open-clip":  # open_clip's CLIP keeps its text tower's modules at the top level
        return {"vision tower": "visual", "text tower": ""}
    return {"vision tower": ""}


def _trainable_model(model, spec: ModelSpec, recipe: str, cfg):
    """The model as the recipe trains it: peft LoRA (and modules_to_save) on an MLLM as ``lora_config`` places it;
    for an encoder its ``trainable`` choice (open_clip's locks, or LoRA on the vision tower)."""
    from peft import get_peft_model

    if spec.family == "hf-vlm":
        from unconfuse.train.mllm import lora_config

        return get_peft_model(model, lora_config(model, cfg.lora))
    if cfg.trainable == "lora":
        from types import SimpleNamespace

        from peft import LoraConfig

        from unconfuse.recipes.clip_hardneg import lora_targets

        targets = lora_targets(SimpleNamespace(weights=model, tower="visual"), cfg.lora.target_modules)
        return get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=targets))
    for name, param in model.named_parameters():  # the towers the recipe's `freeze` locks; the logit scale trains
        vision = name.startswith("visual.")
        if (cfg.trainable == "locked_text" and not vision and "logit" not in name) or \
                (cfg.trainable == "locked_vision" and vision):
            param.requires_grad_(False)
    return model


def _sequences(recipe: str, cfg, spec: ModelSpec) -> dict[str, int]:
    """The device batch's shape: sequences per forward and tokens per sequence (image tokens included)."""
    from unconfuse.train.replay import replay_per_batch

    pair_items = 2 * cfg.train.pairs_per_batch
    items = pair_items + (replay_per_batch(cfg.data.replay_fraction, pair_items) if cfg.data.replay != "none" else 0)
    if spec.family != "hf-vlm":
        return {"sequences": items, "image_tokens": 0, "tokens": 0, "items": items}
    answer = ANSWER_TOKENS
    sequences = items
    if recipe == "mllm_dpo":
        sequences = 2 * items  # chosen and rejected, concatenated in one forward (TRL)
    elif recipe == "mllm_grpo":
        sequences = items * cfg.grpo.num_generations
        answer = cfg.grpo.max_completion_length
    n_image = image_tokens(spec)
    return {"items": items, "sequences": sequences, "image_tokens": n_image,
            "tokens": n_image + PROMPT_TEXT_TOKENS + answer, "scored_tokens": sequences * answer}


# token counts at which one decoder layer is run to measure what autograd keeps: two, so the bytes that grow with
# the tokens (the slope) are told from those that do not (LoRA weights cast to bf16 by autocast)
MEASURE_TOKENS = (8, 24)
FUSED_HEAD_TILE = (4096, 32768)  # TRL's fused LM head works on tiles of this many tokens x vocabulary entries
TRANSFORMERS_NOTICE = ".*is_gradient_checkpointing"


@contextmanager
def _quiet_transformers():
    """Silence transformers' ``is_gradient_checkpointing`` deprecation notice, raised from inside peft and from its
    own forward: nothing a plan's reader can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRANSFORMERS_NOTICE, category=FutureWarning)
        yield


def saved_bytes(module, forward: Callable[[], Any], autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for backward while ``forward()`` runs ``module``: each storage once (a
    tensor saved by several ops, or as views), ``module``'s parameters excluded (they are counted as weights)."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _quiet_transformers():
        forward()
    return sum(kept.values())


@dataclass(frozen=True)
class LayerBytes:
    """What autograd keeps through the language model, measured (``_decoder_layer_bytes``)."""

    per_token: int  # one decoder layer, per token
    per_layer: int  # one decoder layer, whatever the tokens (autocast's bf16 copies of the float32 LoRA weights)
    rest_per_token: int  # the rest of the language model (its final norm), per token


_layer_bytes_cache: dict[tuple, LayerBytes] = {}  # per model, LoRA settings and dtype: plans in one process share it


def _decoder_layer_bytes(trained, key: tuple, dtype_bytes: int) -> LayerBytes:
    """Bytes autograd keeps through one decoder layer of the language model as the recipe trains it (LoRA where
    ``lora_config`` puts it, its dropout, peft's float32 adapters) and through the rest of it, measured, not
    counted: the language model cut to one layer and to none is materialized on the CPU in uninitialised memory
    (only shapes matter) and run on ``MEASURE_TOKENS`` tokens in training mode, under bf16 autocast when the recipe
    trains in bf16, with saved-tensor hooks summing what autograd keeps. The CPU's SDPA keeps, as FlashAttention
    does on a GPU, q, k, v, the output and the softmax statistics (nothing quadratic in the tokens)."""
    import copy

    import torch

    from unconfuse.train.mllm import LANGUAGE_MODELS, _find

    if key in _layer_bytes_cache:
        return _layer_bytes_cache[key]
    language_model = trained.get_submodule(_find(trained, LANGUAGE_MODELS))
    layers = language_model.get_submodule("layers")

    def measured(n_layers: int, tokens: int) -> int:
        shell = copy.copy(language_model)  # the same modules but the first n layers, and no embedding table
        shell._modules = {**language_model._modules, "layers": torch.nn.ModuleList(list(layers)[:n_layers]),
                          "embed_tokens": None}
        small = copy.deepcopy(shell).to_empty(device="cpu").train()
        dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
        hidden = torch.zeros(1, tokens, language_model.config.hidden_size, dtype=dtype, requires_grad=True)
        return saved_bytes(small, lambda: small(inputs_embeds=hidden, use_cache=False), autocast=dtype_bytes == 2)

    few, more = MEASURE_TOKENS
    rest = {n: measured(0, n) for n in (few, more)}
    layer = {n: measured(1, n) - rest[n] for n in (few, more)}
    per_token = (layer[more] - layer[few]) // (more - few)
    _layer_bytes_cache[key] = LayerBytes(per_token, max(layer[few] - per_token * few, 0),
                                         (rest[more] - rest[few]) // (more - few))
    return _layer_bytes_cache[key]


def _fused_head_bytes(scored_tokens: int, hidden_size: int, vocab_size: int, dtype_bytes: int) -> int:
    """What TRL's fused LM head (``add_fused_lm_head``: the recipes' sft, dpo and grpo losses) holds: it never
    materializes the ``[tokens, vocab]`` logits. It keeps, for each scored token (a label that is not -100), the
    final hidden state, the target and two float32 statistics, and works in one tile of at most
    ``FUSED_HEAD_TILE`` (4096 tokens x 32768 vocabulary entries, TRL 1.16's ``TOKEN_CHUNK_SIZE`` and
    ``_CHUNKED_LOGPROB_CHUNK_SIZE``) at a time, forward and backward. On a GPU with Triton it scores only the
    scored tokens (on a CPU, every token)."""
    tile_tokens, tile_vocab = FUSED_HEAD_TILE
    keep = scored_tokens * (hidden_size * dtype_bytes + 8 + 2 * 4)
    return keep + min(scored_tokens, tile_tokens) * min(vocab_size, tile_vocab) * dtype_bytes


def _activation_bytes(text_config, sequence: dict[str, int], layer_bytes: LayerBytes,
                      dtype_bytes: int) -> dict[str, int]:
    """Bytes autograd keeps for one device batch through the language model: the measured decoder layer times the
    layers, the rest of the model (its final norm), and the fused LM head on the scored tokens; with activation
    checkpointing each layer's input instead, and one layer recomputed at a time."""
    tokens = sequence["sequences"] * sequence["tokens"]
    layer = tokens * layer_bytes.per_token + layer_bytes.per_layer
    head = tokens * layer_bytes.rest_per_token + _fused_head_bytes(
        sequence["scored_tokens"], text_config.hidden_size, text_config.vocab_size, dtype_bytes)
    layers = text_config.num_hidden_layers
    return {"off": layers * layer + head, "on": layers * tokens * text_config.hidden_size * dtype_bytes + layer + head}


def _encoder_activation_bytes(model, sequence: dict[str, int], dtype_bytes: int, context: int) -> dict[str, int]:
    """Bytes autograd keeps for one batch through both towers of a CLIP-style encoder: per transformer block about
    16 x width per token (norms, qkv, attention output, MLP's 4x-wide hidden twice), image tokens for the vision
    tower and the context length for the text tower. A ResNet tower is counted as a ViT of its output width."""
    def blocks_and_width(tower) -> tuple[int, int]:
        config = getattr(getattr(tower, "transformer", None), "config", None)  # an HF text tower (BiomedCLIP's BERT)
        if config is not None:
            return config.num_hidden_layers, config.hidden_size
        trunk = getattr(tower, "trunk", None)  # a timm tower
        if trunk is not None:
            return len(trunk.blocks), trunk.embed_dim
        transformer = getattr(tower, "transformer", None)
        if transformer is not None:
            return len(transformer.resblocks), transformer.width
        return 16, getattr(tower, "output_dim", 1024)

    visual = model.visual
    image_size = getattr(visual, "image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    patch = getattr(visual, "patch_size", None) or getattr(getattr(getattr(visual, "trunk", None), "patch_embed", None),
                                                           "patch_size", 16)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    v_blocks, v_width = blocks_and_width(visual)
    t_blocks, t_width = blocks_and_width(getattr(model, "text", model))
    items = sequence["items"]
    total = 16 * dtype_bytes * items * (v_blocks * ((image_size // patch) ** 2 + 1) * v_width + t_blocks * context * t_width)
    return {"off": total, "on": total}  # clip_hardneg refuses activation checkpointing


def _states(trainable: int, largest_layer: int, frozen: int, launch: Launch, dtype_bytes: int) -> tuple[int, int]:
    """(weights, gradients + optimizer state) bytes per GPU, with DeepSpeed's estimators for the trainable part."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the estimators are arithmetic; no GPU needed to import them
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if launch.zero_stage == 3:
        _, states, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, num_gpus_per_node=launch.processes,
                                                              cpu_offload=False, cpu_offload_params=False)
        # the estimate holds the largest layer gathered (4 bytes per parameter) and 18 bytes per trainable one
        # (2 of them the bf16 weights): weights are the shares of frozen and trainable parameters plus that layer
        weights = (frozen + trainable) * dtype_bytes // launch.processes + 4 * largest_layer
        return weights, states - 4 * largest_layer - 2 * trainable // launch.processes
    gpus = launch.processes if launch.zero_stage in (1, 2) else 1  # DDP keeps every state on every GPU
    _, states = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=False)
    return (frozen + trainable) * dtype_bytes, states - 2 * trainable


def _scoring_bytes(spec: ModelSpec, parameters: int, cfg, launch: Launch, text_config) -> int:
    """The whole bf16 model gathered for scoring under ZeRO-3 (already resident otherwise), and a val batch's
    forward activations (no grad: one layer's hidden states and the key/value cache)."""
    gathered = parameters * 2 if launch.zero_stage == 3 else 0
    if text_config is None:
        return gathered
    tokens = 2 * cfg.val_batch_pairs * (image_tokens(spec) + PROMPT_TEXT_TOKENS)
    kv = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    cache = 2 * text_config.num_hidden_layers * tokens * kv * head_dim * 2
    return gathered + cache + tokens * (4 * text_config.hidden_size + 2 * text_config.intermediate_size) * 2


def _largest_layer(model) -> int:
    from accelerate.utils import calculate_maximum_sizes

    _, (largest_bytes, _) = calculate_maximum_sizes(model)
    dtype_bytes = next(model.parameters()).element_size()
    return largest_bytes // dtype_bytes


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or getattr(config, "get_text_config", lambda: None)()


def make_plan(recipe: str, config_path: str | None, overrides: list[str] | None = None, launch: str | None = None,
              gpu_memory_gb: float | None = None) -> Plan:
    """The memory plan of ``recipe`` with this config and overrides under this accelerate launch config."""
    from unconfuse.recipes import recipe_module
    from unconfuse.train.config import load_config

    module = recipe_module(recipe)
    cfg = load_config(module.CONFIG_CLASS, config_path, overrides)
    spec = resolve_model(cfg.model)
    architecture_of(spec)  # a one-line error for a tiny or unknown model before any building
    seat = read_launch(launch)
    dtype_bytes = 2 if cfg.train.bf16 else 4
    model = empty_model(spec, dtype="bfloat16" if cfg.train.bf16 else "float32")
    parameters = parameter_count(model)
    largest = _largest_layer(model)
    parts_of = _parts_of(model, spec, cfg)
    text_config = _text_config(model) if spec.family == "hf-vlm" else None
    with _quiet_transformers():
        trained = _trainable_model(model, spec, recipe, cfg)
    unique = {id(p): (n, p) for n, p in trained.named_parameters()}.values()
    trainable = sum(p.numel() for _, p in unique if p.requires_grad)
    total_with_copies = sum(p.numel() for _, p in unique)

    parts = {part: {"total": 0, "trainable": 0} for part in parts_of}
    for name, param in unique:  # each parameter to the innermost part holding it (Qwen's merger is inside its tower)
        bare = name.removeprefix("base_model.model.")  # peft's wrapper
        holders = [(len(prefix), part) for part, prefix in parts_of.items() if not prefix or bare.startswith(prefix + ".")]
        part = max(holders)[1] if holders else "head, other"  # the LM head, LLaVA-NeXT image_newline
        parts.setdefault(part, {"total": 0, "trainable": 0})
        if "lora_" not in name and "modules_to_save" not in name:
            parts[part]["total"] += param.numel()
        if param.requires_grad:
            parts[part]["trainable"] += param.numel()
    frozen = total_with_copies - trainable
    weights, states = _states(trainable, largest, frozen, seat, dtype_bytes)
    sequence = _sequences(recipe, cfg, spec)
    if text_config is not None:
        layer_bytes = _decoder_layer_bytes(trained, (spec.name, repr(spec.architecture), repr(cfg.lora), dtype_bytes),
                                           dtype_bytes)
        activations = _activation_bytes(text_config, sequence, layer_bytes, dtype_bytes)
        if cfg.lora.vision != "none":  # the tower keeps its activations too when it trains
            vision = model.config.vision_config
            tower_tokens = sequence["items"] * max(image_tokens(spec), 1)
            extra = vision.num_hidden_layers * tower_tokens * 16 * vision.hidden_size * dtype_bytes
            activations = {k: v + (extra if k == "off" else extra // 8) for k, v in activations.items()}
    else:
        model_cfg = architecture_of(spec)["open_clip"]
        # texts are padded to the config's context length (BiomedCLIP's 256, under BERT's 512 positions)
        context = (model_cfg.get("text_cfg", {}).get("context_length") if isinstance(model_cfg, dict) else None) \
            or getattr(model, "context_length", 77)
        activations = _encoder_activation_bytes(model, sequence, dtype_bytes, context)
    plan = Plan(recipe, spec.name, seat, parameters, parts, trainable, weights, states, activations,
                bool(cfg.train.activation_checkpointing), _scoring_bytes(spec, parameters, cfg, seat, text_config), sequence)
    sizes = (gpu_memory_gb,) if gpu_memory_gb else GPU_SIZES_GB
    for size in sizes:
        plan.verdicts[f"{size:g} GB"] = _verdict(plan, size, trainable, largest, frozen, dtype_bytes)
    return plan


def _verdict(plan: Plan, size_gb: float, trainable: int, largest: int, frozen: int, dtype_bytes: int) -> str:
    capacity = size_gb * 1e9
    spare = capacity - plan.peak
    if spare >= 0:
        return f"fits on {plan.launch.processes} x {size_gb:g} GB with {spare / 1e9:.0f} GB to spare ({plan.launch.name})"
    forward_only = plan.scoring - (plan.parameters * 2 if plan.launch.zero_stage == 3 else 0)
    active = plan.activations["on" if plan.activation_checkpointing else "off"]
    for n in (2, 4, 8, 16, 32, 64):
        weights, states = _states(trainable, largest, frozen, Launch(n, 3), dtype_bytes)
        peak = Plan._with_overhead(weights + states + max(active, plan.parameters * 2 + forward_only))
        if peak <= capacity:
            why = (f" (scoring gathers the whole {plan.parameters * 2 / 1e9:.1f} GB bf16 model on every GPU)"
                   if plan.parameters * 2 > capacity / 2 else "")
            return (f"does not fit {plan.launch.name} on {size_gb:g} GB GPUs (needs {plan.peak / 1e9:.0f} GB); "
                    f"needs ZeRO-3 over >= {n} GPUs{why}")
    if not plan.activation_checkpointing:
        return (f"does not fit on {size_gb:g} GB GPUs: one device batch's activations need "
                f"{plan.activations['off'] / 1e9:.0f} GB; set train.activation_checkpointing=true or lower train.pairs_per_batch")
    return (f"does not fit on {size_gb:g} GB GPUs even under ZeRO-3 over 64: one device batch's activations need "
            f"{plan.activations['on'] / 1e9:.0f} GB; lower train.pairs_per_batch")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def format_plan(plan: Plan) -> str:
    """The plan as the command prints it."""
    seq = plan.sequence
    lines = [f"{plan.recipe} on {plan.model} ({plan.parameters / 1e9:.2f}B parameters), {plan.launch.name}"]
    lines.append(f"  {'part':<16}{'parameters':>16}{'trainable':>16}")
    for part, counts in plan.parts.items():
        lines.append(f"  {part:<16}{counts['total']:>16,}{counts['trainable']:>16,}")
    lines.append(f"  {'all':<16}{plan.parameters:>16,}{plan.trainable:>16,}")
    if seq.get("tokens"):
        lines.append(f"  device batch: {seq['sequences']} sequences of ~{seq['tokens']} tokens ({seq['image_tokens']} image tokens "
                     f"each), {seq['scored_tokens']} answer tokens in the loss")
    else:
        lines.append(f"  device batch: {seq['items']} images and texts")
    ckpt = "on" if plan.activation_checkpointing else "off"
    lines += ["  per GPU:",
              f"    weights                    {_gb(plan.weights)}",
              f"    gradients + optimizer      {_gb(plan.gradients_and_optimizer)}  (DeepSpeed's estimator, ZeRO-{plan.launch.zero_stage})",
              f"    activations, ckpt on/off   {_gb(plan.activations['on'])} / {_gb(plan.activations['off'])}  (the config: {ckpt})",
              f"    scoring (whole bf16 model) {_gb(plan.scoring)} on top of the training state",
              f"    peak, with overhead        {_gb(plan.peak)}  (training {_gb(plan.training_peak)}, scoring {_gb(plan.scoring_peak)})",
              "  verdict:"]
    lines += [f"    {size}: {text}" for size, text in plan.verdicts.items()]
    return "\n".join(lines)


def parse_gpu_memory(text: str | None) -> float | None:
    """``80GB``, ``80``, ``141 GB`` -> 80.0 (decimal gigabytes, as GPUs are sold)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:GB|G|gb|g)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text}: expected a size such as 80GB")
    return float(match.group(1))


__all__ = ["Plan", "Launch", "make_plan", "format_plan", "read_launch", "parse_gpu_memory", "GPU_SIZES_GB"]
