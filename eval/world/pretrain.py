"""Brief pretraining of the tiny base models on the embedded world's image-caption corpus.

These stand in for "off-the-shelf" models: a CLIP trained contrastively on the corpus captions
(which name modality and anatomy, and a finding only rarely) and a LLaVA trained on captioning and
simple modality/anatomy questions. Neither ever sees the benchmark's questions, so whatever they
get right or wrong there comes from what the corpus taught them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.clip import multi_positive_clip_loss
from .generator import World, caption


def corpus_records(world: World) -> list[dict[str, Any]]:
    return [json.loads(line) for line in world.corpus.read_text().splitlines() if line.strip()]


def corpus_captions(world: World, records: list[dict[str, Any]], captions: str) -> list[str]:
    """``corpus``: the captions as written (findings rarely named); ``full``: every finding named
    (the oracle corpus that tests use to show the world can tell a confused model from one that is not)."""
    if captions == "corpus":
        return [r["caption"] for r in records]
    if captions != "full":
        raise ValueError(f"captions must be 'corpus' or 'full', got {captions!r}")
    from .generator import SOURCES

    by_key = {(s.modality, s.anatomy): s for s in SOURCES}
    return [caption(by_key[(r["modality"], r["anatomy"])], r["findings"], describe=True) for r in records]


def _load_images(world: World, records: list[dict[str, Any]]):
    from ..images import load_image

    return [load_image(world.root / r["image"]) for r in records]


def pretrain_open_clip(model_dir: Path, world: World, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                       seed: int = 0, captions: str = "corpus") -> dict[str, float]:
    """Contrastive pretraining of the open_clip model saved in ``model_dir``, in place."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    records = corpus_records(world)
    texts = corpus_captions(world, records, captions)
    pixels = torch.stack([preprocess(img) for img in _load_images(world, records)])
    unique = sorted(set(texts))
    text_index = torch.tensor([unique.index(t) for t in texts])
    tokens = tokenizer(unique)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for _ in _steps(steps, "pretraining the tiny CLIP on the world corpus"):
        idx = torch.from_numpy(rng.choice(len(records), size=min(batch_size, len(records)), replace=False))
        out = model(pixels[idx], tokens[text_index[idx]])
        loss = multi_positive_clip_loss(out["image_features"] if isinstance(out, dict) else out[0],
                                        out["text_features"] if isinstance(out, dict) else out[1],
                                        out["logit_scale"] if isinstance(out, dict) else out[2], text_index[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_dir / "open_clip_model.safetensors"))
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])), "steps": steps}


LLAVA_TASKS = (("Describe the image.", "caption"), ("What imaging modality is shown?", "modality"),
               ("Which body part is shown?", "anatomy"))


def letter_question(question: str, answer: str, values: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """``question`` with two lettered options (``answer`` and another of ``values``, in random order) in
    LLaVA-1.5's multiple-choice instruction format, and its reply: the correct letter."""
    other = values[int(rng.integers(len(values) - 1))]
    other = values[-1] if other == answer else other
    options = [answer, other] if rng.random() < 0.5 else [other, answer]
    prompt = f"{question}\nA. {options[0]}\nB. {options[1]}\nAnswer with the option's letter from the given choices directly."
    return prompt, "AB"[options.index(answer)]


def pretrain_llava(model_dir: Path, world: World, steps: int = 300, batch_size: int = 16, lr: float = 1e-3,
                   seed: int = 0, captions: str = "corpus", letter_questions: float = 0.0) -> dict[str, float]:
    """Captioning and modality/anatomy questions for the LLaVA in ``model_dir``, in place; the
    loss is on the reply tokens only. ``letter_questions``: the share of the modality/anatomy questions
    asked as two-option multiple choice answered with a letter, as in LLaVA-1.5's instruction mix.
    Without them the letters are never a reply: AdamW pushes the head rows of all never-emitted tokens
    the same way, they collapse into one direction (cosine > 0.96), and a LoRA that cannot train the
    head can then give "A" or "B" at most p 0.01 (SFT stalls at that floor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    records = corpus_records(world)
    texts = corpus_captions(world, records, captions)
    images = _load_images(world, records)
    values = {field: sorted({r[field] for r in records}) for _, field in LLAVA_TASKS if field != "caption"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    model.train()
    losses = []
    for _ in _steps(steps, "pretraining the tiny LLaVA on the world corpus"):
        idx = rng.choice(len(records), size=min(batch_size, len(records)), replace=False)
        prompts, fulls = [], []
        for i in idx:
            question, field = LLAVA_TASKS[int(rng.integers(len(LLAVA_TASKS)))]
            reply = texts[i] if field == "caption" else records[i][field]
            if field != "caption" and letter_questions and rng.random() < letter_questions:
                question, reply = letter_question(question, reply, values[field], rng)
            user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompts.append(processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
            fulls.append(processor.apply_chat_template(
                user + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}], tokenize=False))
        batch_images = [images[i] for i in idx]
        inputs = processor(text=fulls, images=batch_images, return_tensors="pt", padding=True)
        prompt_lengths = [len(ids) for ids in processor(text=prompts, images=batch_images)["input_ids"]]
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        for row, n in enumerate(prompt_lengths):
            labels[row, :n] = -100  # no loss on the image and the prompt
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    tokenizer.padding_side = "left"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])), "steps": steps}


def _steps(steps: int, what: str):
    """range(steps) with a progress bar on a terminal, else a line every tenth of the way (pretraining
    takes minutes on a CPU)."""
    import sys

    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        yield from tqdm(range(steps), desc=what, unit="step", leave=False)
        return
    every = max(1, steps // 10)
    for step in range(steps):
        yield step
        if (step + 1) % every == 0 or step + 1 == steps:
            print(f"{what}: step {step + 1}/{steps}", file=sys.stderr, flush=True)


PRETRAINERS = {"clip": pretrain_open_clip, "llava": pretrain_llava}
