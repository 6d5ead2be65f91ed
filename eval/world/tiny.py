"""Tiny random models built from config, so that everything runs without downloads.

Each builder writes a normal Hugging Face / open_clip model folder (safetensors weights,
tokenizer, processor, chat template); the adapters then load it exactly as they load a real
checkpoint. Builds are deterministic (fixed seed, tokenizer trained on a fixed corpus).
"""
from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import Any

# A byte-level BPE over a small fixed corpus: enough for the prompts, options and answers we use.
TOKENIZER_CORPUS = [
    "Based on the image, choose the correct option for the following question.",
    "Question: Answer: Answer with the option's letter from the given choices directly.",
    "Your answer should be just one letter. #answer: (\"A\": (\"B\": A: B:",
    "Based on the image, answer following question.",
    "What imaging modality is shown? Which side is the lesion on? Is there a fracture?",
    "CT MRI X-ray radiograph ultrasound nuclear medicine angiogram chest abdomen head brain leg",
    "left right upper lower small large one two present absent normal abnormal lesion nodule",
    "USER: ASSISTANT: SYSTEM: user assistant system yes no",
    string.ascii_letters + string.digits + string.punctuation,
]

# Chat templates that mark assistant turns with {% generation %} (TRL's assistant_only_loss needs it).
# The reply follows "ASSISTANT:" with no space: with a space, byte-level BPE would merge " A" into one
# token but split " B" into " " + "B", and the space would fall outside the generation block.
_RENDER_CONTENT = (
    "{% macro render(content, image) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if item['type'] == 'image' %}{{ image }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
)

LLAVA_CHAT_TEMPLATE = _RENDER_CONTENT + (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "ASSISTANT:{% generation %}{{ render(message['content'], '<image>\\n') }}</s>{% endgeneration %}\n"
    "{% else %}"
    "{% if message['role'] == 'user' %}USER: {% else %}SYSTEM: {% endif %}"
    "{{ render(message['content'], '<image>\\n') }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = _RENDER_CONTENT + (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content'], '') }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "{{ render(message['content'], '<|vision_start|><|image_pad|><|vision_end|>') }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(specials: list[str], extra_specials: dict[str, str], chat_template: str,
                    bos: str | None, eos: str, pad: str, vocab_size: int = 400, append_eos: bool = False):
    """A byte-level BPE tokenizer trained offline on ``TOKENIZER_CORPUS``. ``append_eos`` ends every
    text with ``eos``, as CLIP's tokenizer does (CLIP's text tower pools at the EOS position)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS * 5, trainer=trainer)
    if bos:
        end = f" {eos}" if append_eos else ""
        specials_used = [(bos, tok.token_to_id(bos))] + ([(eos, tok.token_to_id(eos))] if append_eos else [])
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A{end}", pair=f"{bos} $A $B{end}",
                                                           special_tokens=specials_used)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                     extra_special_tokens=extra_specials, chat_template=chat_template,
                                     model_max_length=4096)
    hf_tok.padding_side = "left"  # batched scoring and generation pad on the left
    return hf_tok


def _image_processor_class(name: str):
    import transformers

    try:  # transformers 5: torchvision-backed processor; PIL one without torchvision
        import torchvision  # noqa: F401

        return getattr(transformers, name)
    except ImportError:  # pragma: no cover
        return getattr(transformers, f"{name}Pil")


def build_llava(out: Path, image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32,
                text_hidden: int = 64, layers: int = 2, vision_layers: int | None = None, heads: int = 4,
                seed: int = 0) -> None:
    """A tiny LlavaForConditionalGeneration (CLIP vision tower + Llama) with processor."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], {"image_token": "<image>"},
                          LLAVA_CHAT_TEMPLATE, bos="<s>", eos="</s>", pad="<pad>")
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers or layers,
                              num_attention_heads=heads, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=text_hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _qwen_text_config(vocab: int, ids: dict[str, int], hidden: int, layers: int, heads: int, rope_theta: float) -> dict:
    """The text model of the Qwen2-VL family: 3-D rotary positions (M-RoPE) split over time, height, width."""
    head_dim = hidden // heads
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}


def build_qwen2_vl(out: Path, image_size: int = 56, patch_size: int = 14, vision_hidden: int = 32,
                   text_hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> None:
    """A tiny Qwen2VLForConditionalGeneration with its processor (needs ``image_grid_thw``)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(specials, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                          QWEN_CHAT_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    config = Qwen2VLConfig(
        vision_config={"depth": layers, "embed_dim": vision_hidden, "hidden_size": text_hidden, "num_heads": heads,
                       "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "mlp_ratio": 2},
        text_config=_qwen_text_config(len(tok), ids, text_hidden, layers, heads, rope_theta=10000.0),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    pixels = image_size * image_size
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(
        min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    from transformers import Qwen2VLVideoProcessor

    video_processor = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=2,
                                            temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 chat_template=QWEN_CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _trl_chat_template(name: str) -> str:
    """A chat template as TRL ships it (verbatim copies of the checkpoints' templates, and training variants
    that only add ``{% generation %}`` markers around assistant turns and render the same text)."""
    from importlib.resources import files

    return (files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def build_qwen2_5_vl(out: Path, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, patch_size: int = 14,
                     vision_hidden: int = 32, text_hidden: int = 64, layers: int = 2, vision_layers: int = 4,
                     fullatt_block_indexes: tuple[int, ...] = (1, 3), window_size: int = 56, heads: int = 4,
                     seed: int = 0) -> None:
    """A tiny Qwen2_5_VLForConditionalGeneration with the real processor classes and chat template.

    Dynamic resolution as in the real model (images are resized to multiples of 28 px between
    ``min_pixels`` and ``max_pixels``: 56-112 px images give 4-16 image tokens); the vision tower
    has windowed blocks (``window_size`` px windows: 2x2 merged tokens) and full-attention blocks
    (``fullatt_block_indexes``), as the real one does every eighth block.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    # TRL's training variant of the Qwen2.5-VL template: the real template's text, with {% generation %} markers
    template = _trl_chat_template("qwen2_5_vl_training")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(specials, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                     "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
                          template, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    config = Qwen2_5_VLConfig(
        vision_config={"depth": vision_layers, "hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2,
                       "num_heads": heads, "out_hidden_size": text_hidden, "patch_size": patch_size,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": window_size,
                       "fullatt_block_indexes": list(fullatt_block_indexes)},
        text_config=_qwen_text_config(len(tok), ids, text_hidden, layers, heads, rope_theta=1000000.0),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, ids["<|endoftext|>"]]
    kwargs = {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": patch_size, "merge_size": 2,
              "temporal_patch_size": 2}
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(**kwargs)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**kwargs), chat_template=template)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_gemma3(out: Path, image_size: int = 64, patch_size: int = 8, mm_tokens_per_image: int = 16,
                 vision_hidden: int = 32, text_hidden: int = 64, layers: int = 2, vision_layers: int = 2, heads: int = 4,
                 sliding_window: int = 512, projector_std: float = 0.5, initializer_range: float = 0.1,
                 seed: int = 0) -> None:
    """A tiny Gemma3ForConditionalGeneration (MedGemma's architecture: SigLIP tower, pooled projector,
    Gemma 3 text model with sliding and full attention layers) with the real processor classes,
    Gemma 3's special tokens and chat template (which writes ``<bos>`` itself).

    Gemma 3 initialises its projector to zero, so a random twin would ignore images: the projector
    and its norm are drawn at ``projector_std`` instead, and the text model at ``initializer_range``
    0.1 (not 0.02), so that what image tokens see of each other (Gemma 3 attends bidirectionally
    within an image) moves the scores by more than float noise.
    """
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    template = _trl_chat_template("gemma3_training")  # the real template's text with {% generation %} markers
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = build_tokenizer(specials, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                     "image_token": "<image_soft_token>"},
                          template, bos="<bos>", eos="<eos>", pad="<pad>")
    tok.unk_token = "<unk>"
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    config = Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", "image_size": image_size, "patch_size": patch_size,
                       "hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2,
                       "num_hidden_layers": vision_layers, "num_attention_heads": heads, "vision_use_head": False},
        text_config={"vocab_size": len(tok), "hidden_size": text_hidden, "intermediate_size": text_hidden * 2,
                     "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
                     "head_dim": text_hidden // heads, "query_pre_attn_scalar": text_hidden // heads,
                     "max_position_embeddings": 4096, "sliding_window": sliding_window,
                     "initializer_range": initializer_range,
                     "layer_types": ["sliding_attention"] * (layers - 1) + ["full_attention"],
                     "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"], "pad_token_id": ids["<pad>"]},
        mm_tokens_per_image=mm_tokens_per_image, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        projector.mm_input_projection_weight.normal_(0.0, projector_std)
        projector.mm_soft_emb_norm.weight.normal_(0.0, projector_std)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, ids["<end_of_turn>"]]
    image_processor = _image_processor_class("Gemma3ImageProcessor")(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                image_seq_length=mm_tokens_per_image)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_open_clip(out: Path, image_size: int = 32, embed_dim: int = 32, vision_width: int = 64, vision_layers: int = 2,
                    patch_size: int = 8, text_width: int = 64, text_layers: int = 2, context_length: int = 32,
                    vision_tower: str = "vit", seed: int = 0) -> None:
    """A tiny open_clip model saved as a ``local-dir:`` checkpoint (open_clip_config.json + safetensors).

    ``vision_tower: resnet`` gives open_clip's ModifiedResNet, which learns spatial findings on CPU
    far faster than a tiny ViT (DESIGN.md).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    if vision_tower == "resnet":
        vision_cfg: dict[str, Any] = {"image_size": image_size, "layers": [1, 1, 1, 1], "width": vision_width}
    else:
        vision_cfg = {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                      "head_width": 16, "patch_size": patch_size}
    model_cfg = {"embed_dim": embed_dim, "vision_cfg": vision_cfg,
                 "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                              "heads": 4, "layers": text_layers}}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                         "std": list(open_clip.OPENAI_DATASET_STD)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # open_clip warns that a fresh model has no weights: expected here
    try:
        model = open_clip.create_model(f"local-dir:{out}", pretrained=None, load_weights=False)
    finally:
        root.setLevel(level)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def build_hf_clip(out: Path, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2,
                  projection_dim: int = 16, context_length: int = 77, seed: int = 0) -> None:
    """A tiny transformers CLIPModel with a CLIPProcessor."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    tok = build_tokenizer(["<|endoftext|>", "<|startoftext|>", "<pad>"], {}, "", bos="<|startoftext|>",
                          eos="<|endoftext|>", pad="<pad>", append_eos=True)
    tok.padding_side = "right"
    tok.chat_template = None
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                                   num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=context_length,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                                       intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_dinov2(out: Path, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2,
                 initializer_range: float = 0.02, seed: int = 0) -> None:
    """A tiny random transformers Dinov2Model with its image processor (mining's encoder B offline).
    At the usual init (0.02) every image gets nearly the same pooled embedding; a wide init (0.5)
    makes it a random-feature image similarity that spreads over [0.2, 0.9] on the world's images."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, mlp_ratio=2, initializer_range=initializer_range)
    torch.manual_seed(seed)
    Dinov2Model(config).save_pretrained(out)
    _image_processor_class("BitImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(out)


BUILDERS = {"dinov2": build_dinov2, "llava": build_llava, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
            "gemma3": build_gemma3, "open_clip": build_open_clip, "hf_clip": build_hf_clip}


def materialize(name: str, build: dict[str, Any]) -> Path:
    """Build tiny model ``name`` into ``built_model_dir(name)`` once (where ``load_model`` looks);
    rebuild it when its settings changed. Returns the folder.

    ``build`` holds the builder's settings (``arch`` picks the builder) and optionally
    ``pretrain``: {task: clip|llava, world: {WorldConfig overrides}, steps, batch_size, lr, seed,
    captions}, a brief pretraining on that embedded world's corpus. The identity covers the
    settings and, when pretrained, the world's content, so a changed world gives a new model. The
    folder appears atomically: concurrent processes never see half a model.
    """
    import hashlib

    from transformers.utils import logging as hf_logging

    from ..home import built_model_dir
    from ..io import atomic_folder

    settings = dict(build)
    arch = settings.pop("arch")
    pretrain = dict(settings.pop("pretrain", None) or {})
    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny model arch {arch!r}; known: {', '.join(BUILDERS)}")
    world = None
    if pretrain:
        from .generator import WorldConfig, default_world

        world = default_world(WorldConfig(**pretrain.pop("world", {})))
    identity = [arch, settings, pretrain, world.hash if world else None, BUILD_VERSION]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    target = built_model_dir(name)
    record_path = target / "unconfuse_build.json"
    if (target / ".complete").exists() and json.loads(record_path.read_text()).get("digest") == digest:
        return target
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars for models of a few MB
    try:
        with atomic_folder(target, keep_existing=not target.exists()) as tmp:
            BUILDERS[arch](tmp, **settings)
            record: dict[str, Any] = {"arch": arch, **settings, "digest": digest}
            if pretrain:
                from .pretrain import PRETRAINERS

                task = pretrain.pop("task")
                record["pretrain"] = {"task": task, **pretrain, "world": str(world.root), "world_hash": world.hash,
                                      "result": PRETRAINERS[task](tmp, world, **pretrain)}
            (tmp / "unconfuse_build.json").write_text(json.dumps(record, indent=2))
            (tmp / ".complete").write_text("")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return target


BUILD_VERSION = 3  # bump when a builder changes, so cached tiny models are rebuilt
