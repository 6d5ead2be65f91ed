"""One adapter for transformers image-text-to-text models (LLaVA, LLaVA-NeXT, Qwen2/2.5-VL, Gemma3/MedGemma, ...).

Efficiency, as the eval contract asks:
- each unique image goes through the vision tower once per pass: its features are cached by
  ``Query.image_key`` and handed to the model as ``mm_encoder_outputs`` (transformers' API for
  pre-encoded images), so a second question about the same image skips the encoder;
- prompts are batched (left padding);
- option scoring (``prefix`` mode) runs the shared prompt once, then scores every option from its
  KV cache, instead of one full forward per option.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch

from .base import ModelLoadError, Query


class HFVisionLanguageAdapter:
    """Scores and generates with an ``AutoModelForImageTextToText`` + ``AutoProcessor``."""

    def __init__(self, model_path: str, *, name: str | None = None, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False, system_prompt: str | None = None, revision: str | None = None,
                 max_cached_images: int = 256, model: Any = None, processor: Any = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = name or model_path
        self.system_prompt = system_prompt
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.processor = processor or AutoProcessor.from_pretrained(
                model_path, trust_remote_code=trust_remote_code, revision=revision)
            if model is None:
                kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision,
                                          "use_safetensors": True}
                if dtype != "auto" or self.device.type != "cpu":
                    kwargs["dtype"] = getattr(torch, dtype) if dtype != "auto" else "auto"
                model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {self.name!r} from {model_path!r}: {exc}. If it is a hub id, "
                                 "download it first or unset HF_HUB_OFFLINE; offline, use a local folder or a tiny preset.") from exc
        self.model = model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = self.model.model if hasattr(getattr(self.model, "model", None), "get_image_features") else self.model
        self.uses_mrope = hasattr(self.base, "rope_deltas")  # Qwen2-VL family: 3-D positions
        self.can_cache_features = "mm_encoder_outputs" in inspect.signature(self.model.forward).parameters
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_cached_images = max_cached_images
        self.image_encoder_calls = 0  # images run through the vision tower (tests and benchmarks read it)

    # -- prompts ---------------------------------------------------------------------------------

    def _messages(self, prompt: str, reply: str | None = None) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        if reply is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return messages

    def render(self, prompt: str) -> str:
        """The chat-formatted prompt text, ending where the assistant's reply begins."""
        return self.processor.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)

    def reply_text(self, prompt: str, rendered: str, reply: str) -> str:
        """The text the chat template puts between the prompt and the end of ``reply``
        (e.g. ``" Yes"`` after LLaVA's ``ASSISTANT:``), so option scoring follows the template."""
        full = self.processor.apply_chat_template(self._messages(prompt, reply), tokenize=False)
        if full.startswith(rendered):
            end = full.find(reply, len(rendered))
            if end >= 0:
                return full[len(rendered):end + len(reply)]
        return " " + reply

    # -- encoding --------------------------------------------------------------------------------

    def _inputs(self, queries: list[Query]) -> dict[str, Any]:
        texts = [self.render(q.prompt) for q in queries]
        inputs = self.processor(text=texts, images=[q.image for q in queries], return_tensors="pt", padding=True)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def _split_pixels(self, inputs: dict[str, Any], n: int) -> list[dict[str, torch.Tensor]]:
        """Per-image slices of the processor's image tensors."""
        pixels = inputs["pixel_values"]
        if "image_grid_thw" in inputs:  # patches of all images are concatenated along dim 0
            grids = inputs["image_grid_thw"]
            sizes = grids.prod(-1).tolist()
            chunks = torch.split(pixels, sizes)
            return [{"pixel_values": c, "image_grid_thw": grids[i:i + 1]} for i, c in enumerate(chunks)]
        parts = [{"pixel_values": pixels[i:i + 1]} for i in range(n)]
        if "image_sizes" in inputs:
            for i, part in enumerate(parts):
                part["image_sizes"] = inputs["image_sizes"][i:i + 1]
        return parts

    @torch.no_grad()
    def _image_features(self, queries: list[Query], inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Vision features of each query's image, computing only those not cached yet."""
        parts = self._split_pixels(inputs, len(queries))
        todo: dict[str, dict[str, torch.Tensor]] = {}
        for q, part in zip(queries, parts):
            if q.image_key not in self._features and q.image_key not in todo:
                todo[q.image_key] = part
        if todo:
            batch = {key: torch.cat([p[key] for p in todo.values()]) for key in next(iter(todo.values()))}
            out = self.base.get_image_features(**batch, return_dict=True)
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            for key, feat in zip(todo, feats):
                self._features[key] = feat
            self.image_encoder_calls += len(todo)
        result = []
        for q in queries:
            self._features.move_to_end(q.image_key)
            result.append(self._features[q.image_key])
        while len(self._features) > self.max_cached_images:
            self._features.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        self._features.clear()

    def _model_kwargs(self, queries: list[Query], inputs: dict[str, Any]) -> dict[str, Any]:
        """Forward kwargs: text tensors plus the cached image features (or pixels as a fallback)."""
        kwargs = dict(inputs)
        if self.can_cache_features:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            features = self._image_features(queries, inputs)
            for key in ("pixel_values", "image_sizes"):
                kwargs.pop(key, None)
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        else:
            self.image_encoder_calls += len(queries)
        if not self.uses_mrope:
            # explicit positions so that left padding does not shift them (and the continuation can follow on)
            mask = kwargs["attention_mask"]
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    # -- the three questions ---------------------------------------------------------------------

    def letter_token_ids(self, candidates: tuple[str, ...]) -> list[int]:
        """First token of each candidate, encoded as the reference does (no special tokens)."""
        return [self.tokenizer.encode(c, add_special_tokens=False)[0] for c in candidates]

    @torch.no_grad()
    def next_token_scores(self, queries: list[Query], candidates: tuple[str, ...] = ("A", "B")) -> list[list[float]]:
        inputs = self._inputs(queries)
        out = self.model(**self._model_kwargs(queries, inputs), logits_to_keep=1, use_cache=False)
        logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        ids = self.letter_token_ids(candidates)
        return logprobs[:, ids].tolist()

    def continuation_ids(self, queries: list[Query], continuations: list[tuple[str, ...]]) -> list[list[list[int]]]:
        """Token ids of each continuation as it follows its prompt (split from a joint encoding)."""
        result = []
        for q, conts in zip(queries, continuations):
            rendered = self.render(q.prompt)
            prompt_ids = self.tokenizer.encode(rendered, add_special_tokens=False)
            rows = []
            for cont in conts:
                text = self.reply_text(q.prompt, rendered, cont)
                joint = self.tokenizer.encode(rendered + text, add_special_tokens=False)
                if joint[:len(prompt_ids)] != prompt_ids:  # a merge across the boundary: encode apart
                    joint = prompt_ids + self.tokenizer.encode(text, add_special_tokens=False)
                rows.append(joint[len(prompt_ids):])
            result.append(rows)
        return result

    @torch.no_grad()
    def continuation_scores(self, queries: list[Query], continuations: list[tuple[str, ...]]) -> list[list[float]]:
        k = len(continuations[0])
        if any(len(c) != k for c in continuations):
            raise ValueError("every query needs the same number of continuations")
        cont_ids = self.continuation_ids(queries, continuations)
        inputs = self._inputs(queries)
        kwargs = self._model_kwargs(queries, inputs)
        prefix_mask = kwargs["attention_mask"]
        out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        first_logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).repeat_interleave(k, dim=0)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        cache.batch_repeat_interleave(k)

        flat = [ids for rows in cont_ids for ids in rows]
        length = max(len(ids) for ids in flat)
        pad = self.tokenizer.pad_token_id
        cont = torch.full((len(flat), length), pad, dtype=torch.long, device=self.device)
        cont_mask = torch.zeros_like(cont)
        for i, ids in enumerate(flat):
            cont[i, :len(ids)] = torch.tensor(ids, device=self.device)
            cont_mask[i, :len(ids)] = 1
        full_mask = torch.cat([prefix_mask.repeat_interleave(k, dim=0), cont_mask], dim=1)
        start = prefix_mask.sum(-1).repeat_interleave(k).unsqueeze(1)  # valid prefix length per row
        positions = start + torch.arange(length, device=self.device).unsqueeze(0)
        if self.uses_mrope:
            deltas = self.base.rope_deltas.to(self.device).repeat_interleave(k, dim=0)
            positions = (positions + deltas).unsqueeze(0).expand(3, -1, -1)
        cont_out = self.model(input_ids=cont, attention_mask=full_mask, position_ids=positions,
                              cache=cache, use_cache=True)
        logprobs = torch.log_softmax(cont_out.logits.float(), dim=-1)
        scores = []
        for i, ids in enumerate(flat):
            token_lp = [first_logprobs[i, ids[0]]]
            token_lp += [logprobs[i, t - 1, ids[t]] for t in range(1, len(ids))]
            scores.append(torch.stack(token_lp).mean().item())  # length-normalised (geometric mean prob)
        return [scores[i * k:(i + 1) * k] for i in range(len(queries))]

    @torch.no_grad()
    def generate(self, queries: list[Query], max_new_tokens: int) -> list[str]:
        inputs = self._inputs(queries)
        kwargs = self._model_kwargs(queries, inputs)
        kwargs.pop("position_ids", None)  # generate derives positions from the attention mask
        output = self.model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     temperature=None, top_p=None, top_k=None,
                                     pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
