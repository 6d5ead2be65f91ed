"""Tiny random models built from config, so that everything runs without downloads.

Each builder writes a normal Hugging Face / open_clip model folder (safetensors weights,
tokenizer, processor, chat template); the adapters then load it exactly as they load a real
checkpoint. Builds are deterministic (fixed seed, tokenizer trained on a fixed corpus).
"""
from __future__ import annotations

import contextlib
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
                    bos: str | None, eos: str, pad: str, vocab_size: int = 400, append_eos: bool = False,
                    corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained offline on ``corpus`` (default ``TOKENIZER_CORPUS``). ``append_eos``
    ends every text with ``eos``, as CLIP's tokenizer does (CLIP's text tower pools at the EOS position)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus or TOKENIZER_CORPUS) * 5, trainer=trainer)
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
                    vision_tower: str = "vit", head_width: int | None = 16, seed: int = 0) -> None:
    """A tiny open_clip model saved as a ``local-dir:`` checkpoint (open_clip_config.json + safetensors).

    ``vision_tower: resnet`` gives open_clip's ModifiedResNet, which learns spatial findings on CPU
    far faster than a tiny ViT (DESIGN.md). ``head_width: null`` leaves the key out, as open_clip's
    ViT-L-14.json does (open_clip's default, 64 per head).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    if vision_tower == "resnet":
        vision_cfg: dict[str, Any] = {"image_size": image_size, "layers": [1, 1, 1, 1], "width": vision_width}
    else:
        vision_cfg = {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                      **({"head_width": head_width} if head_width else {}), "patch_size": patch_size}
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


# Mistral's tokenizer (SentencePiece) gives the reply after "[/INST]" as one "▁A" / "▁B" token: a few chat turns in
# the corpus give the byte-level BPE the same " A" / " B" merges (TOKENIZER_CORPUS alone splits " B" into " " + "B").
MISTRAL_CORPUS = TOKENIZER_CORPUS + ["[INST] Question? [/INST] A</s> [INST] Question? [/INST] B</s> " * 4]


def build_llava_next(out: Path, image_size: int = 64, patch_size: int = 16, vision_hidden: int = 32,
                     text_hidden: int = 64, layers: int = 2, vision_layers: int = 2, heads: int = 4,
                     seed: int = 0) -> None:
    """A tiny LlavaNextForConditionalGeneration as llava-hf/llava-v1.6-mistral-7b-hf is built: CLIP vision
    tower (features of the second-to-last layer, CLS dropped), Mistral text model (no sliding window, rope
    theta 1e6, as its config has it), ``image_newline``, and the real processor classes configured like the
    real ones: anyres tiling over the real grid pinpoints scaled from 336 px tiles to ``image_size`` (1x2,
    2x1, 2x2, 3x1, 1x3 tiles plus the whole image), so images of other sizes or aspect ratios give other
    numbers of tiles and image tokens (64 px tiles: 112x84 px -> 5 tiles, 70 tokens; 64x96 -> 3, 46).
    Chat template: TRL's training variant of the real one ([INST] ... [/INST], no BOS written: the
    tokenizer adds it), Mistral's special tokens and the llava-hf ``<image>`` and ``<pad>``.
    """
    import torch
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor,
                              MistralConfig)

    template = _trl_chat_template("llava_next_training")  # the real template's text with {% generation %} markers
    tok = build_tokenizer(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<image>", "<pad>"], {"image_token": "<image>"},
                          template, bos="<s>", eos="</s>", pad="<pad>", corpus=MISTRAL_CORPUS)
    tok.unk_token = "<unk>"
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
                              num_attention_heads=heads, projection_dim=vision_hidden)
    text = MistralConfig(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=text_hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=4096, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # llava-v1.6's pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] in tiles
    pinpoints = [[image_size * h, image_size * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, image_seq_length=(image_size // patch_size) ** 2,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor = _image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints, resample=3, do_center_crop=True, do_pad=True)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_biomedclip(out: Path, image_size: int = 64, timm_model_name: str = "test_vit", embed_dim: int = 32,
                     text_hidden: int = 32, text_layers: int = 2, heads: int = 4, context_length: int = 64,
                     initializer_range: float = 0.1, seed: int = 0) -> None:
    """A tiny BiomedCLIP: open_clip's CustomTextCLIP with a timm ViT vision tower and a Hugging Face BERT
    text tower, saved as a ``local-dir:`` checkpoint whose open_clip_config.json has BiomedCLIP's keys
    (``timm_model_name``, ``timm_pool: ""``, ``timm_proj: linear``; ``hf_model_name``, ``hf_tokenizer_name``,
    ``hf_proj_type: mlp``, ``hf_pooler_type: cls_last_hidden_state_pooler``, ``context_length``).

    open_clip creates a timm tower from its name alone (no size reaches timm), so the tower is timm's
    ``test_vit``: the VisionTransformer of BiomedCLIP's ``vit_base_patch16_224`` (patch 16, class-token
    pooling, blocks of attn.qkv / attn.proj / mlp.fc1 / mlp.fc2) at width 64 and depth 6, with dynamic image
    size (64 px: 16 patches). BERT's config and an uncased WordPiece tokenizer ([PAD]=0, [CLS] ... [SEP], as
    PubMedBERT's) over ``TOKENIZER_CORPUS``'s words are in ``bert/``, which ``hf_model_name`` and
    ``hf_tokenizer_name`` name as BiomedCLIP's name its BERT's hub repo (an absolute path: open_clip resolves
    it as a path or hub id, never relative to the model folder; ``materialize`` points it at the folder's
    final place). The tokenizer is also in the folder itself, where ``open_clip.get_tokenizer("local-dir:...")``
    reads it. BERT is drawn at ``initializer_range`` 0.1: at 0.02 every text gets the same [CLS] embedding
    (cosine 1.000 between any two options), so options could not differ.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertConfig, BertTokenizer

    # the vocabulary: every word of the corpus whole, and characters (initial and ##) for any other word;
    # built, not trained: tokenizers' WordPieceTrainer breaks ties differently from run to run
    normalize, split = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for text in TOKENIZER_CORPUS for w, _ in split.pre_tokenize_str(normalize.normalize_str(text))})
    chars = sorted({c for w in words for c in w})
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *words, *(f"##{c}" for c in chars)]
    tok = BertTokenizer(vocab={p: i for i, p in enumerate(dict.fromkeys(pieces))}, do_lower_case=True,
                        model_max_length=context_length)
    bert = out / "bert"
    tok.save_pretrained(bert)
    tok.save_pretrained(out)
    BertConfig(vocab_size=len(tok), hidden_size=text_hidden, num_hidden_layers=text_layers, num_attention_heads=heads,
               intermediate_size=text_hidden * 4, max_position_embeddings=context_length, pad_token_id=tok.pad_token_id,
               initializer_range=initializer_range).save_pretrained(bert)
    model_cfg = {"embed_dim": embed_dim,
                 "vision_cfg": {"timm_model_name": timm_model_name, "timm_model_pretrained": False, "timm_pool": "",
                                "timm_proj": "linear", "image_size": image_size},
                 "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                              "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": context_length}}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                         "std": list(open_clip.OPENAI_DATASET_STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # open_clip warns that a fresh model has no weights: expected here
    try:  # pretrained_text=False: BERT's weights are drawn here, not read from bert/ (which has none)
        model = open_clip.create_model(f"local-dir:{out}", pretrained=None, load_weights=False, pretrained_text=False)
    finally:
        root.setLevel(level)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def _relocate_hf_text_tower(folder: Path, target: Path) -> None:
    """Where an open_clip config in ``folder`` names a path inside ``folder`` (``hf_model_name``,
    ``hf_tokenizer_name``), name the same path inside ``target``, where the folder is about to move."""
    path = folder / "open_clip_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    inside = [key for key in ("hf_model_name", "hf_tokenizer_name")
              if text_cfg.get(key) and Path(text_cfg[key]).is_relative_to(folder)]
    for key in inside:
        text_cfg[key] = str(target / Path(text_cfg[key]).relative_to(folder))
    if inside:
        path.write_text(json.dumps(config, indent=2))


def build_siglip(out: Path, image_size: int = 64, patch_size: int = 16, hidden: int = 32, layers: int = 2,
                 heads: int = 4, context_length: int = 64, vocab_size: int = 200, seed: int = 0) -> None:
    """A tiny transformers SiglipModel (MAP-pooled vision head, text pooled at the last position) with the
    real SiglipProcessor: a SiglipImageProcessor and a SiglipTokenizer over a SentencePiece unigram model
    trained offline on ``TOKENIZER_CORPUS`` (lower-cased, punctuation dropped, as the tokenizer canonicalises
    texts), with the real one's pieces ``<pad>`` 0, ``</s>`` 1 (also its pad token), ``<unk>`` 2 and
    ``model_max_length`` 64: SigLIP was trained on texts padded to 64, which eval's backend does."""
    import io

    import sentencepiece
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor, SiglipTokenizer

    corpus = [text.lower().translate(str.maketrans("", "", string.punctuation)) for text in TOKENIZER_CORPUS]
    spiece = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 5), model_writer=spiece, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(spiece.getvalue())
    tok = SiglipTokenizer(str(out / "spiece.model"), model_max_length=context_length)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # saving diffs against SiglipTextConfig(), whose default BOS/EOS (49406/49407) lie outside its default vocab: transformers warns
    try:
        config = SiglipConfig(
            text_config={"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": hidden * 2,
                         "num_hidden_layers": layers, "num_attention_heads": heads,
                         "max_position_embeddings": context_length, "pad_token_id": tok.pad_token_id,
                         "bos_token_id": None, "eos_token_id": tok.eos_token_id},
            vision_config={"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden,
                           "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": heads})
        torch.manual_seed(seed)
        model = SiglipModel(config)
        model.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
    image_processor = _image_processor_class("SiglipImageProcessor")(size={"height": image_size, "width": image_size})
    SiglipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


# LLaVA-Med's mistral_instruct turns, so that the tiny SentencePiece model has Mistral's "▁A" / "▁B" reply tokens
LLAVA_MED_CORPUS = TOKENIZER_CORPUS + ["[INST] <image>\nQuestion? [/INST] A </s>[INST] Question? [/INST] B </s>"] * 4


def write_llava_med_original(src: Path, tower: Path, image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32,
                             text_hidden: int = 64, layers: int = 2, vision_layers: int = 2, heads: int = 4,
                             vocab_size: int = 640, carry_vision: bool = True, shards: int = 2, seed: int = 0) -> None:
    """A tiny checkpoint in LLaVA-Med v1.5's original layout, as microsoft/llava-med-v1.5-mistral-7b ships it,
    in ``src``, and its CLIP tower as a CLIPModel folder in ``tower`` (openai/clip-vit-large-patch14-336's role).

    ``src``: config.json of ``LlavaMistralForCausalLM`` (``model_type: llava_mistral``, Mistral's keys with a
    top-level ``rope_theta`` 1e6 and no sliding window, LLaVA's ``mm_*`` keys, ``image_aspect_ratio: pad``);
    weights in ``shards`` safetensors files with an index, under LLaVA's names (``model.embed_tokens``,
    ``model.layers.*``, ``model.norm``, ``lm_head``, ``model.mm_projector.0/2`` and, with ``carry_vision``,
    the tower's as ``model.vision_tower.vision_tower.vision_model.*``); Mistral's tokenizer files: a
    SentencePiece BPE ``tokenizer.model`` (byte fallback, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no ``<image>``)
    with Mistral's ``tokenizer_config.json`` (``legacy: true``, pad ``<unk>``).
    """
    import io

    import sentencepiece
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, MistralConfig, MistralForCausalLM

    src.mkdir(parents=True, exist_ok=True)
    spiece = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LLAVA_MED_CORPUS * 5), model_writer=spiece, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    (src / "tokenizer.model").write_bytes(spiece.getvalue())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (src / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 4096,
         "padding_side": "right", "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
         "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False}, indent=2))

    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2, "num_hidden_layers": 1,
                     "num_attention_heads": heads},
        vision_config={"image_size": image_size, "patch_size": patch_size, "hidden_size": vision_hidden,
                       "intermediate_size": vision_hidden * 2, "num_hidden_layers": vision_layers,
                       "num_attention_heads": heads}, projection_dim=vision_hidden))
    clip.save_pretrained(tower)
    _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(tower)

    text = {"vocab_size": vocab_size, "hidden_size": text_hidden, "intermediate_size": text_hidden * 2,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "initializer_range": 0.02,
            "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
            "sliding_window": None, "use_cache": True}
    language = MistralForCausalLM(MistralConfig(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    projector = torch.nn.Sequential(torch.nn.Linear(vision_hidden, text_hidden), torch.nn.GELU(),
                                    torch.nn.Linear(text_hidden, text_hidden))
    weights = {name: t.contiguous() for name, t in language.state_dict().items()}
    weights |= {f"model.mm_projector.{name}": t for name, t in projector.state_dict().items()}
    if carry_vision:  # LLaVA saves its CLIPVisionTower (a CLIPVisionModel in `.vision_tower`) with the model
        with safe_open(str(tower / "model.safetensors"), framework="pt") as fh:
            weights |= {f"model.vision_tower.vision_tower.{k}": fh.get_tensor(k) for k in fh.keys()
                        if k.startswith("vision_model.")}
    names = list(weights)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: weights[name] for name in names[i * per_shard:(i + 1) * per_shard]}
        save_file(part, str(src / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in part}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["LlavaMistralForCausalLM"],
              "model_type": "llava_mistral", **text, "rope_theta": 1e6, "torch_dtype": "float32",
              "transformers_version": "4.36.2", "image_aspect_ratio": "pad", "mm_hidden_size": vision_hidden,
              "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
              "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
              "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
              "freeze_mm_mlp_adapter": False, "use_mm_proj": True}
    (src / "config.json").write_text(json.dumps(config, indent=2))
    (src / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.2"}, indent=2))


def build_llava_med(out: Path, seed: int = 0, **settings: Any) -> None:
    """A tiny LLaVA-Med v1.5 as ``unconfuse convert llava-med`` makes it: a checkpoint in the original layout
    (``write_llava_med_original``) converted into ``out`` (LlavaForConditionalGeneration, LlavaProcessor with
    the pad-to-square image processor and LLaVA-Med's mistral_instruct chat template)."""
    import tempfile

    from ..convert import convert_llava_med

    with tempfile.TemporaryDirectory(prefix="llava-med-original-") as tmp:
        src, tower = Path(tmp) / "llava-med-v1.5-mistral-7b", Path(tmp) / "clip-vit"
        write_llava_med_original(src, tower, seed=seed, **settings)
        convert_llava_med(src, tower, None, out, seed=seed)


BUILDERS = {"dinov2": build_dinov2, "llava": build_llava, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
            "gemma3": build_gemma3, "open_clip": build_open_clip, "hf_clip": build_hf_clip,
            "llava_next": build_llava_next, "biomedclip": build_biomedclip, "siglip": build_siglip,
            "llava_med": build_llava_med}


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
                with _one_thread():  # the same weights whatever the process's thread count (demo workers, tests)
                    result = PRETRAINERS[task](tmp, world, **pretrain)
                record["pretrain"] = {"task": task, **pretrain, "world": str(world.root), "world_hash": world.hash,
                                      "result": result}
            _relocate_hf_text_tower(tmp, target)  # after pretraining, which loads the model from tmp
            (tmp / "unconfuse_build.json").write_text(json.dumps(record, indent=2))
            (tmp / ".complete").write_text("")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return target


BUILD_VERSION = 4  # bump when a builder changes, so cached tiny models are rebuilt


@contextlib.contextmanager
def _one_thread():
    """Torch on one intra-op thread inside the block: float sums are then added in one order, so a
    pretrained model's weights (and every number measured on it) do not depend on how many cores or
    threads the process that built it had, while the cache keys them by settings alone."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
