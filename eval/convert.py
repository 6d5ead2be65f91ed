"""Convert LLaVA-Med's original checkpoint into a transformers LLaVA folder that eval and the recipes load.

microsoft/llava-med-v1.5-mistral-7b ships LLaVA's own format: a ``LlavaMistralForCausalLM`` config
(``model_type: llava_mistral``, Mistral's text keys plus LLaVA's ``mm_*`` keys), Mistral weights under
LLaVA's names plus ``model.mm_projector.{0,2}`` (``mlp2x_gelu``) and, as saved by LLaVA,
``model.vision_tower.vision_tower.*`` (a CLIP ViT-L/14-336), and Mistral's SentencePiece tokenizer
without an image token. ``convert_llava_med`` writes a ``LlavaForConditionalGeneration`` with a
``LlavaProcessor`` that asks the model as LLaVA-Med's own code does: the ``mistral_instruct``
conversation (``[INST] <image>\\n{question} [/INST]``), images padded to a square with the mean colour
(``image_aspect_ratio: pad``), features of layer ``mm_vision_select_layer`` without the CLS token.

Used by ``unconfuse convert llava-med`` (cli/eval.py) and by the tiny twin
``tiny-llava-med`` (eval/world/tiny.py), which converts a tiny checkpoint written in the original layout.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

from .io import atomic_folder, atomic_write_json

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
PAD_TO_MULTIPLE_OF = 64  # as transformers' convert_llava_weights_to_hf.py: 32000 + 2 tokens -> 32064 rows
NEW_ROW_COVARIANCE_SCALE = 1e-5  # new rows ~ N(mean, 1e-5 * covariance) of the old embeddings, as that script draws them
RECORD = "unconfuse_convert.json"

# LLaVA's additions to the text config (LlavaMistralConfig = MistralConfig + these): they describe the
# vision side, which the converted folder states in LlavaConfig and the processor instead.
LLAVA_CONFIG_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution", "image_split_resolution",
                     "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "freeze_mm_vision_resampler",
                     "unfreeze_mm_vision_tower", "tokenizer_model_max_length", "tokenizer_padding_side",
                     "feature_outs", "img_size", "vision_backbone", "segtok_posembed", "proj_vis_to_txt_tokens",
                     "prompt_segtok_w_instruct"}
# buffers that older checkpoints saved and that the model recomputes (rotary frequencies, CLIP position ids)
RECOMPUTED_BUFFERS = (".rotary_emb.inv_freq", ".embeddings.position_ids")

# LLaVA-Med's conversation `mistral_instruct` (llava/conversation.py: SeparatorStyle.LLAMA_2, system "",
# sep "", sep2 "</s>"): "[INST] <image>\n{question} [/INST]", a reply as " {reply} </s>", the system text (if
# any) as <<SYS>>...<</SYS>> in the first user turn. The BOS that LLaVA-Med's tokenizer_image_token puts first is
# written here, so that tokenizing without special tokens (TRL) and with them (eval, which then adds none) both
# give one. {% generation %} marks the reply for TRL's assistant-only loss.
_MACROS = (
    "{% macro text(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for item in content %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endmacro %}"
    "{% macro images(content) %}{% if content is not string %}"
    "{% for item in content %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% endif %}{% endmacro %}"
)
LLAVA_MED_CHAT_TEMPLATE = _MACROS + (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = text(message['content']) %}"
    "{% elif message['role'] == 'user' %}"
    "[INST] {% if ns.system %}<<SYS>>\n{{ ns.system }}\n<</SYS>>\n\n{% set ns.system = '' %}{% endif %}"
    "{{ images(message['content']) }}{{ text(message['content']) }} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %} {{ text(message['content']) }} </s>{% endgeneration %}"
    "{% else %}{{ raise_exception('LLaVA-Med conversations have system, user and assistant turns only') }}"
    "{% endif %}"
    "{% endfor %}"
)


class ConvertError(ValueError):
    """Bad input to a conversion: the message names the file, key or tensor."""


def convert_llava_med(src: str | Path, vision_tower: str | Path, tokenizer: str | Path | None, out: str | Path,
                      seed: int = 0) -> Path:
    """Convert LLaVA-Med's original checkpoint folder ``src`` into a LlavaForConditionalGeneration folder ``out``.

    ``vision_tower``: the CLIP tower LLaVA-Med names (``mm_vision_tower``), a hub id or a local
    CLIPVisionModel / CLIPModel folder: its config, preprocessing and, unless ``src`` carries the tower's
    weights, its weights. ``tokenizer``: LLaVA-Med's tokenizer (default: the one in ``src``); ``<image>``
    and ``<pad>`` are added and the embeddings grown to a multiple of 64 rows, the new rows drawn as
    transformers' convert_llava_weights_to_hf.py draws them (``seed`` fixes them). Every tensor of ``src``
    must find its place and every tensor of the model must be filled, else ``ConvertError`` names it.
    ``out`` appears whole (safetensors, config, processor, chat template, unconfuse_convert.json).
    """
    import torch
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    src, out = Path(src).expanduser(), Path(out).expanduser()
    _check_out(src, out)
    original = _read_config(src)
    mm = _vision_settings(src, original)
    vision_config, vision_processor = _load_tower_config(vision_tower)
    if vision_config.hidden_size != mm["mm_hidden_size"]:
        raise ConvertError(f"{src / 'config.json'}: mm_hidden_size {mm['mm_hidden_size']} is not the hidden size "
                           f"{vision_config.hidden_size} of the vision tower {vision_tower}")
    tok, added = _load_tokenizer(tokenizer if tokenizer is not None else src)
    text_config, dropped = _text_config(original)
    old_vocab = text_config.vocab_size
    if tok.vocab_size > old_vocab:
        raise ConvertError(f"tokenizer {tokenizer or src} has {tok.vocab_size} tokens but {src / 'config.json'} "
                           f"has vocab_size {old_vocab}: not LLaVA-Med's tokenizer")
    new_vocab = -(-max(len(tok), old_vocab) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    text_config.vocab_size = new_vocab
    text_config.pad_token_id = tok.pad_token_id
    strategy = "default" if mm["mm_vision_select_feature"] == "patch" else "full"  # default: drop CLS, as "patch"
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
                         vision_feature_select_strategy=strategy, vision_feature_layer=mm["mm_vision_select_layer"],
                         image_seq_length=patches if strategy == "default" else patches + 1,
                         tie_word_embeddings=bool(original.get("tie_word_embeddings", False)))

    with torch.device("meta"):
        target_model = LlavaForConditionalGeneration(config)
    targets = {name: tuple(t.shape) for name, t in target_model.state_dict().items()}
    vision_inner = not any(n.startswith("model.vision_tower.vision_model.") for n in targets)

    source = _read_weights(src)
    dtype = source["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in source else torch.float32
    state: dict[str, torch.Tensor] = {}
    skipped = []
    for name, tensor in source.items():
        if name.endswith(RECOMPUTED_BUFFERS):
            skipped.append(name)
            continue
        target = _target_name(name, vision_inner)
        if target is None or target not in targets:
            raise ConvertError(f"{src}: tensor {name!r} has no place in LlavaForConditionalGeneration "
                               "(not a LLaVA-Med v1.5 checkpoint?)")
        state[target] = tensor
    vision_from_src = any(n.startswith("model.vision_tower.") for n in state)
    if not vision_from_src:
        for name, tensor in _load_tower_weights(vision_tower).items():
            state["model.vision_tower." + name] = tensor
    if config.tie_word_embeddings:  # the head is the embedding: nothing of its own to fill
        targets.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)

    embed, head = "model.language_model.embed_tokens.weight", "lm_head.weight"
    if embed in state and state[embed].shape[0] != old_vocab:
        raise ConvertError(f"{src}: model.embed_tokens.weight has {state[embed].shape[0]} rows but config.json "
                           f"says vocab_size {old_vocab}")
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ConvertError(f"{src}: missing tensor {_source_name(missing[0], vision_inner)!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    grown = _grow_embeddings(state[embed], [state[head]] if head in state else [], new_vocab, seed)
    state[embed] = grown[0]
    if head in state:
        state[head] = grown[1]
    for name, tensor in state.items():
        if tuple(tensor.shape) != targets[name]:
            raise ConvertError(f"{src}: tensor {_source_name(name, vision_inner)!r} has shape {tuple(tensor.shape)}, "
                               f"the model wants {targets[name]} (config.json and the weights disagree)")
        state[name] = tensor.to(dtype)

    target_model.load_state_dict(state, strict=True, assign=True)
    target_model.config.dtype = dtype
    generation = (GenerationConfig.from_pretrained(src) if (src / "generation_config.json").exists()
                  else GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    generation.pad_token_id = tok.pad_token_id
    target_model.generation_config = generation
    image_processor = _llava_image_processor(vision_processor, pad=mm["image_aspect_ratio"] == "pad")
    tok.chat_template = LLAVA_MED_CHAT_TEMPLATE
    tok.padding_side = "left"  # batched scoring and generation pad on the left
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                               chat_template=LLAVA_MED_CHAT_TEMPLATE)
    record = {"format": "llava-med", "source": str(src.resolve()), "vision_tower": _where(vision_tower),
              "tokenizer": _where(tokenizer if tokenizer is not None else src),
              "vision_weights": "source" if vision_from_src else "vision tower", "tensors": len(state),
              "skipped_buffers": skipped, "dropped_config_keys": dropped, "added_tokens": added,
              "vocab_size": {"source": old_vocab, "converted": new_vocab}, "seed": seed,
              "image_processor": {"do_pad": image_processor.do_pad, "from": type(vision_processor).__name__}}
    with _quiet_transformers(), atomic_folder(out) as tmp:
        target_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / RECORD, record)
    return out


# -- reading the original ------------------------------------------------------------------------------

def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise ConvertError(f"--out {out} is the source folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD).exists())):
        raise ConvertError(f"--out {out} exists and is not a converted model; remove it or pick another folder")


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{src}: no config.json (SRC is LLaVA-Med's checkpoint folder, e.g. a local snapshot of "
                           "microsoft/llava-med-v1.5-mistral-7b)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not JSON ({exc})") from exc
    if config.get("model_type") != "llava_mistral":
        raise ConvertError(f"{path}: model_type {config.get('model_type')!r} is not LLaVA-Med v1.5's 'llava_mistral' "
                           "(LlavaMistralForCausalLM)")
    return config


def _vision_settings(src: Path, config: dict[str, Any]) -> dict[str, Any]:
    path = src / "config.json"
    for key in ("mm_vision_tower", "mm_hidden_size", "mm_projector_type"):
        if key not in config:
            raise ConvertError(f"{path}: no {key} (LLaVA's vision settings are missing)")
    if config["mm_projector_type"] != "mlp2x_gelu":
        raise ConvertError(f"{path}: mm_projector_type {config['mm_projector_type']!r}: LlavaForConditionalGeneration "
                           "holds LLaVA-1.5's 'mlp2x_gelu' projector only")
    if config.get("mm_use_im_start_end"):
        raise ConvertError(f"{path}: mm_use_im_start_end is true: prompts with <im_start>/<im_end> are not supported")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConvertError(f"{path}: mm_vision_select_feature {feature!r} is not 'patch' or 'cls_patch'")
    return {"mm_hidden_size": config["mm_hidden_size"], "mm_vision_select_feature": feature,
            "mm_vision_select_layer": config.get("mm_vision_select_layer", -2),
            "image_aspect_ratio": config.get("image_aspect_ratio")}


def _text_config(config: dict[str, Any]):
    """MistralConfig from the original's config, without LLaVA's keys (returned, for the record)."""
    from transformers import MistralConfig

    dropped = sorted(k for k in config if k.startswith("mm_") or k in LLAVA_CONFIG_KEYS)
    text = {k: v for k, v in config.items() if k not in dropped and k not in ("model_type", "architectures", "_name_or_path")}
    return MistralConfig(**text, architectures=["MistralForCausalLM"]), dropped


def _weight_files(src: Path) -> list[Path]:
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = src / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConvertError(f"{index}: not a weight index ({exc})") from exc
            for shard in shards:
                if not (src / shard).is_file():
                    raise ConvertError(f"{index}: shard {shard} is not in {src}")
            return [src / s for s in shards]
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise ConvertError(f"{src}: no weights (model*.safetensors or pytorch_model*.bin)")


def _read_weights(src: Path) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(src):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        tensors[key] = fh.get_tensor(key)
            else:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:  # a truncated or foreign file: name it
            raise ConvertError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    return tensors


_PROJECTOR = {"0": "linear_1", "2": "linear_2"}  # nn.Sequential(Linear, GELU, Linear)


def _target_name(name: str, vision_inner: bool) -> str | None:
    """The LlavaForConditionalGeneration name of an original tensor (None: it has no place)."""
    if name.startswith("model.mm_projector."):
        index, _, param = name[len("model.mm_projector."):].partition(".")
        return f"model.multi_modal_projector.{_PROJECTOR[index]}.{param}" if index in _PROJECTOR else None
    if name.startswith("model.vision_tower."):
        rest = name[len("model.vision_tower."):]
        if not rest.startswith("vision_tower."):
            return None
        rest = rest[len("vision_tower."):]
        if vision_inner and rest.startswith("vision_model."):  # transformers 5 keeps CLIP's layers one level up
            rest = rest[len("vision_model."):]
        return "model.vision_tower." + rest
    if name == "model.image_newline":
        return None  # LLaVA-NeXT's; not in a flat LLaVA-1.5 model
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name if name == "lm_head.weight" else None


def _source_name(target: str, vision_inner: bool) -> str:
    """The original name of a target tensor (for messages)."""
    for prefix, original in (("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                             ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                             ("model.language_model.", "model.")):
        if target.startswith(prefix):
            return original + target[len(prefix):]
    if target.startswith("model.vision_tower."):
        rest = target[len("model.vision_tower."):]
        return "model.vision_tower.vision_tower." + ("vision_model." if vision_inner else "") + rest
    return target


# -- the vision tower and the tokenizer ----------------------------------------------------------------

@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading CLIPVisionModel from a CLIPModel lists the text tower's tensors as unexpected (expected
    here); saving shows progress bars for a handful of files."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_tower_config(vision_tower: str | Path):
    from transformers import AutoImageProcessor, CLIPVisionConfig

    try:
        with _quiet_transformers():
            config = CLIPVisionConfig.from_pretrained(str(vision_tower))
            processor = AutoImageProcessor.from_pretrained(str(vision_tower))
    except (OSError, ValueError) as exc:
        raise ConvertError(f"--vision-tower {vision_tower}: cannot load a CLIP vision config and image processor "
                           f"({_first_line(exc)}); offline, pass a local copy of it") from exc
    if config.model_type != "clip_vision_model":
        raise ConvertError(f"--vision-tower {vision_tower}: a {config.model_type!r} config, not CLIP's")
    return config, processor


def _load_tower_weights(vision_tower: str | Path) -> dict[str, Any]:
    from transformers import CLIPVisionModel

    try:
        with _quiet_transformers():
            model, info = CLIPVisionModel.from_pretrained(str(vision_tower), output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"--vision-tower {vision_tower}: cannot load CLIP vision weights ({_first_line(exc)})") from exc
    if info["missing_keys"]:
        raise ConvertError(f"--vision-tower {vision_tower}: missing tensor {sorted(info['missing_keys'])[0]!r}")
    return dict(model.state_dict())


def _load_tokenizer(tokenizer: str | Path):
    """LLaVA-Med's tokenizer plus ``<image>`` and, where it has none of its own, a ``<pad>`` (as llava-hf's
    conversions do: reusing ``<unk>`` or ``</s>`` would hide real tokens under the padding mask)."""
    from transformers import AddedToken, AutoTokenizer

    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError, TypeError) as exc:
        raise ConvertError(f"--tokenizer {tokenizer}: cannot load a tokenizer ({_first_line(exc)})") from exc
    added = {}
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added["image"] = IMAGE_TOKEN
    if tok.pad_token is None or tok.pad_token in (tok.unk_token, tok.eos_token):
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
        added["pad"] = PAD_TOKEN
    if tok.bos_token is None or tok.eos_token is None:
        raise ConvertError(f"--tokenizer {tokenizer}: no BOS or EOS token (LLaVA-Med's tokenizer has <s> and </s>)")
    return tok, added


def _llava_image_processor(clip_processor, pad: bool):
    """LlavaImageProcessor with the tower's preprocessing; ``pad``: LLaVA's ``image_aspect_ratio: pad``
    (expand2square with the mean colour, then the tower's resize and crop)."""
    import transformers

    try:
        import torchvision  # noqa: F401

        cls = transformers.LlavaImageProcessor
    except ImportError:  # pragma: no cover
        cls = transformers.LlavaImageProcessorPil
    settings = clip_processor.to_dict()
    keep = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    return cls(**{k: settings[k] for k in keep if k in settings}, do_pad=pad)


def _grow_embeddings(embed, heads: list, rows: int, seed: int) -> list:
    """``embed`` (and the LM heads) grown to ``rows`` rows; new rows drawn from N(mean, 1e-5 * covariance)
    of the old embedding rows (transformers' convert_llava_weights_to_hf.py), or the mean where the
    covariance is singular (fewer rows than dimensions)."""
    import torch

    old, width = embed.shape
    if rows == old:
        return [embed, *heads]
    weights = embed.float()
    mean = weights.mean(0)
    centered = weights - mean
    covariance = centered.T @ centered / old
    factor, info = torch.linalg.cholesky_ex(NEW_ROW_COVARIANCE_SCALE * covariance)
    generator = torch.Generator().manual_seed(seed)
    grown = []
    for tensor in (embed, *heads):
        if int(info) == 0:
            new = mean + torch.randn(rows - old, width, generator=generator) @ factor.T
        else:
            new = mean.expand(rows - old, width)
        grown.append(torch.cat([tensor, new.to(tensor.dtype)]))
    return grown


def _where(model: str | Path) -> str:
    """A local folder as an absolute path, a hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return re.sub(r"\s+", " ", text[0]) if text else type(exc).__name__
