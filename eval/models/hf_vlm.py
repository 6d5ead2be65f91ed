"""One backend for transformers image-text-to-text models (LLaVA, LLaVA-NeXT, Qwen2/2.5-VL, Gemma3/MedGemma, ...).

Efficiency, as the eval contract asks:
- each unique image goes through the vision tower once per pass: its features are cached by
  ``Query.image_key`` and handed to the model as ``mm_encoder_outputs`` (transformers' API for
  pre-encoded images), so a second question about the same image skips the encoder;
- prompts are batched (left padding);
- the part of a prompt up to and including its image is the same for every question about that
  image: it runs once per image and its KV cache is shared (``prefill``);
- option scoring (``prefix`` mode) runs the shared prompt once, then scores every option from its
  KV cache, instead of one full forward per option.

Models whose forward takes no pre-encoded images (no ``mm_encoder_outputs``), prompts with no image
token before the reply, prompts with reference images before the question's image (the ``retrieve``
strategy), and batches whose padded layout would not be exact under the model's sliding-window
attention take the plain path instead: scores from one unpadded forward per query
(and per option) with its pixels, generation from the pixels of the batch (``plain_path`` forces
it; tests/test_twins.py holds both paths to a naive forward per question).
"""
from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .base import ModelLoadError, Query, Reference


class HFVisionLanguageBackend:
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
                from transformers.integrations import is_deepspeed_zero3_enabled

                if self.device.type == "cuda" and not is_deepspeed_zero3_enabled():
                    kwargs["device_map"] = {"": str(self.device)}  # straight onto this process's GPU
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
        self.plain_path = not self.can_cache_features  # True: no cached features, no prefix sharing
        self._stacked_features: bool | None = None  # get_image_features gives one tensor (Gemma 3) or one per image
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_cached_images = max_cached_images
        self.image_encoder_calls = 0  # images run through the vision tower (tests and benchmarks read it)

    # -- prompts ---------------------------------------------------------------------------------

    def _messages(self, prompt: str, reply: str | None = None,
                  references: Sequence[Reference] = ()) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content: list[dict[str, Any]] = []
        for ref in references:  # each reference image, then its text, before the question's image
            content += [{"type": "image"}, {"type": "text", "text": ref.text}]
        messages.append({"role": "user", "content": [*content, {"type": "image"}, {"type": "text", "text": prompt}]})
        if reply is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return messages

    def render(self, prompt: str, references: Sequence[Reference] = ()) -> str:
        """The chat-formatted prompt text, ending where the assistant's reply begins."""
        return self.processor.apply_chat_template(self._messages(prompt, references=references),
                                                  add_generation_prompt=True, tokenize=False)

    def reply_text(self, prompt: str, rendered: str, reply: str, references: Sequence[Reference] = ()) -> str:
        """The text the chat template puts between the prompt and the end of ``reply``
        (e.g. ``" Yes"`` after LLaVA's ``ASSISTANT:``), so option scoring follows the template."""
        full = self.processor.apply_chat_template(self._messages(prompt, reply, references), tokenize=False)
        if full.startswith(rendered):
            end = full.find(reply, len(rendered))
            if end >= 0:
                return full[len(rendered):end + len(reply)]
        return " " + reply

    # -- encoding --------------------------------------------------------------------------------

    def _inputs(self, queries: list[Query]) -> dict[str, Any]:
        """The processor's tensors of ``queries`` (each query's reference images, then its own), with each
        query's ``distort`` applied to its own image's pixels."""
        texts = [self.render(q.prompt, q.references) for q in queries]
        # Templates that write BOS themselves (Gemma 3) must not get a second one from the tokenizer: the rule
        # of transformers' own processor.apply_chat_template(tokenize=True).
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos and all(t.startswith(bos) for t in texts))
        # one list of images per prompt: processors that take several images per prompt (Gemma 3) read a
        # flat list as all of them belonging to one prompt
        inputs = self.processor(text=texts, images=[[*(r.image for r in q.references), q.image] for q in queries],
                                return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        if any(q.distort for q in queries):
            parts = self._split_pixels(inputs, sum(len(q.references) + 1 for q in queries))
            own = 0
            for q in queries:
                own += len(q.references)  # the query's own image follows its references
                if q.distort is not None:
                    parts[own]["pixel_values"] = q.distort(parts[own]["pixel_values"])
                own += 1
            inputs["pixel_values"] = torch.cat([part["pixel_values"] for part in parts])
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def _split_pixels(self, inputs: dict[str, Any], n: int) -> list[dict[str, torch.Tensor]]:
        """Per-image slices of the processor's image tensors. LLaVA-NeXT's rows hold each image's tiles padded
        to the batch's most, with ``image_sizes`` saying how many are real (its features differ in length per
        image; they are cached per image, so a later batch's padding never matters)."""
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
            self._stacked_features = torch.is_tensor(feats)
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

    def _encoder_outputs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """Cached features as ``mm_encoder_outputs``, in the form the model's own ``get_image_features``
        gives them: one stacked tensor (models that call ``.to()`` on it, Gemma 3) or one per image."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled: Any = torch.stack(features) if self._stacked_features else list(features)
        return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}

    def _model_kwargs(self, queries: list[Query], inputs: dict[str, Any]) -> dict[str, Any]:
        """Generation kwargs: text tensors plus the cached image features (or pixels as a fallback)."""
        kwargs = dict(inputs)
        if not self.plain_path and not any(q.references for q in queries):
            features = self._image_features(queries, inputs)
            for key in ("pixel_values", "image_sizes"):
                kwargs.pop(key, None)
            kwargs["mm_encoder_outputs"] = self._encoder_outputs(features)
        else:
            self.image_encoder_calls += len(queries)
        return kwargs

    # -- prompt prefill with per-image prefix sharing ---------------------------------------------

    @property
    def image_token_id(self) -> int | None:
        config = self.model.config
        return getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)

    @property
    def sliding_window(self) -> int | None:
        """The language model's attention window, when some of its layers use one."""
        config = self.model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        return window

    def _fits_window(self, width: int) -> bool:
        """Whether a padded layout ``width`` columns wide is exact under sliding-window attention: windows
        count columns, holes included, so columns and real positions only agree while every pair of
        tokens is inside the window."""
        window = self.sliding_window
        return window is None or width < window

    @torch.no_grad()
    def prefill(self, queries: list[Query], extra_width: int = 0) -> Prefill | None:
        """Run every prompt up to where the reply starts, sharing the work of repeated images.

        A prompt is split after its image: the head (system text, image tokens) is the same for
        every question about an image, so each distinct head runs once and its KV cache is copied
        to the questions that use it; then the tails (question text, generation prompt) run on
        top. Heads and tails are each left-padded, so rows hold holes; positions count real
        tokens, which keeps the numbers equal to one unpadded forward per question. The head runs
        with the processor's token types (``mm_token_type_ids``, Gemma 3's ``token_type_ids``), so
        models that attend bidirectionally within an image do so here as in a full forward.

        Returns None where this cannot be exact (plain path, no image token before the reply, a
        padded width of the prompts plus ``extra_width`` beyond the sliding window): the callers
        then take the plain path.
        """
        if self.plain_path or self.image_token_id is None or any(q.references for q in queries):
            return None
        inputs = self._inputs(queries)
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        type_keys = [k for k in ("mm_token_type_ids", "token_type_ids") if k in inputs]
        image_id = self.image_token_id
        heads: dict[tuple, int] = {}
        head_rows: list[int] = []
        head_parts, tail_parts = [], []
        for r, q in enumerate(queries):
            real = ids[r][mask[r]]
            where = (real == image_id).nonzero()
            if len(where) == 0 or int(where[-1]) + 1 >= len(real):
                return None
            cut = int(where[-1]) + 1
            key = (q.image_key, tuple(real[:cut].tolist()))
            if key not in heads:
                heads[key] = len(head_parts)
                head_types = {k: inputs[k][r][mask[r]][:cut] for k in type_keys}
                head_parts.append((real[:cut], head_types, r))
            head_rows.append(heads[key])
            tail_parts.append(real[cut:])
        width = max(len(h) for h, _, _ in head_parts) + max(len(t) for t in tail_parts) + extra_width
        if not self._fits_window(width):
            return None
        features = self._image_features(queries, inputs)

        # 1. distinct heads
        pad = self.tokenizer.pad_token_id
        head_ids, head_mask = _left_pad([h for h, _, _ in head_parts], pad, self.device)
        kwargs: dict[str, Any] = {"input_ids": head_ids, "attention_mask": head_mask,
                                  "mm_encoder_outputs": self._encoder_outputs([features[r] for _, _, r in head_parts])}
        if "image_grid_thw" in inputs:
            kwargs["image_grid_thw"] = inputs["image_grid_thw"][[r for _, _, r in head_parts]]
        for k in type_keys:
            kwargs[k], _ = _left_pad([t[k] for _, t, _ in head_parts], 0, self.device)
        if not self.uses_mrope:
            kwargs["position_ids"] = (head_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        index = torch.tensor(head_rows, device=self.device)
        cache.batch_select_indices(index)
        deltas = self.base.rope_deltas.to(self.device)[index] if self.uses_mrope else None

        # 2. tails, on top of each question's head
        tail_ids, tail_mask = _left_pad(tail_parts, pad, self.device)
        full_mask = torch.cat([head_mask[index], tail_mask], dim=1)
        positions = self._positions((full_mask.cumsum(-1) - 1).clamp(min=0)[:, head_ids.shape[1]:], deltas)
        out = self.model(input_ids=tail_ids, attention_mask=full_mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        return Prefill(cache=cache, mask=full_mask, next_position=full_mask.sum(-1), deltas=deltas,
                       last_logprobs=torch.log_softmax(out.logits[:, -1, :].float(), dim=-1))

    @torch.no_grad()
    def _plain_logprobs(self, query: Query, continuation: Sequence[int] = ()) -> torch.Tensor:
        """The plain path: one unpadded forward of ``query``'s prompt (plus ``continuation``) with its
        pixels. Row t holds the log-probabilities of the token after prompt + continuation[:t]."""
        inputs = self._inputs([query])
        n = inputs["input_ids"].shape[1]
        if continuation:
            extra = torch.tensor([list(continuation)], dtype=torch.long, device=self.device)
            for key, fill in (("input_ids", extra), ("attention_mask", torch.ones_like(extra)),
                              ("mm_token_type_ids", torch.zeros_like(extra)), ("token_type_ids", torch.zeros_like(extra))):
                if key in inputs:
                    inputs[key] = torch.cat([inputs[key], fill], dim=1)
        self.image_encoder_calls += 1
        logits = self.model(**inputs).logits[0, n - 1:]
        return torch.log_softmax(logits.float(), dim=-1)

    def _positions(self, positions: torch.Tensor, deltas: torch.Tensor | None) -> torch.Tensor:
        """Text positions; 3-D M-RoPE ones (shifted by each row's rope delta) for the Qwen2-VL family."""
        if deltas is None:
            return positions
        return (positions + deltas).unsqueeze(0).expand(3, -1, -1)

    # -- the three questions ---------------------------------------------------------------------

    def letter_token_ids(self, candidates: tuple[str, ...], query: Query | None = None) -> list[int]:
        """The first token of each candidate as the chat template renders it as the reply.

        For LLaVA-1.5 (SentencePiece "▁A" after "ASSISTANT:") and Qwen ("A" after "assistant\n")
        this is the token the reference takes (``encode("A")``); for templates that put a space
        before the reply it is the spaced token the model is trained to emit, not the bare letter.
        """
        if query is None:
            return [self.tokenizer.encode(c, add_special_tokens=False)[0] for c in candidates]
        return [ids[0] for ids in self.continuation_ids([query], [candidates])[0]]

    @torch.no_grad()
    def next_token_scores(self, queries: list[Query], candidates: tuple[str, ...] = ("A", "B")) -> list[list[float]]:
        state = self.prefill(queries)
        if state is not None:
            logprobs = state.last_logprobs
        else:
            logprobs = torch.stack([self._plain_logprobs(q)[0] for q in queries])
        return logprobs[:, self.letter_token_ids(candidates, queries[0])].tolist()

    def continuation_ids(self, queries: list[Query], continuations: list[tuple[str, ...]]) -> list[list[list[int]]]:
        """Token ids of each continuation as it follows its prompt (split from a joint encoding)."""
        result = []
        for q, conts in zip(queries, continuations):
            rendered = self.render(q.prompt, q.references)
            prompt_ids = self.tokenizer.encode(rendered, add_special_tokens=False)
            rows = []
            for cont in conts:
                text = self.reply_text(q.prompt, rendered, cont, q.references)
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
        length = max(len(ids) for rows in cont_ids for ids in rows)
        state = self.prefill(queries, extra_width=length)
        if state is None:
            return [[_token_logprobs(self._plain_logprobs(q, ids), ids).mean().item() for ids in rows]
                    for q, rows in zip(queries, cont_ids)]
        state.cache.batch_repeat_interleave(k)
        first_logprobs = state.last_logprobs.repeat_interleave(k, dim=0)

        flat = [ids for rows in cont_ids for ids in rows]
        cont = torch.full((len(flat), length), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        cont_mask = torch.zeros_like(cont)
        for i, ids in enumerate(flat):
            cont[i, :len(ids)] = torch.tensor(ids, device=self.device)
            cont_mask[i, :len(ids)] = 1
        full_mask = torch.cat([state.mask.repeat_interleave(k, dim=0), cont_mask], dim=1)
        start = state.next_position.repeat_interleave(k).unsqueeze(1)
        deltas = state.deltas.repeat_interleave(k, dim=0) if state.deltas is not None else None
        positions = self._positions(start + torch.arange(length, device=self.device).unsqueeze(0), deltas)
        out = self.model(input_ids=cont, attention_mask=full_mask, position_ids=positions, cache=state.cache,
                         use_cache=True)
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        scores = []
        for i, ids in enumerate(flat):
            token_lp = [first_logprobs[i, ids[0]]]
            token_lp += [logprobs[i, t - 1, ids[t]] for t in range(1, len(ids))]
            scores.append(torch.stack(token_lp).mean().item())  # length-normalised (geometric mean prob)
        return [scores[i * k:(i + 1) * k] for i in range(len(queries))]

    @torch.no_grad()
    def generate(self, queries: list[Query], max_new_tokens: int, logits_processor: Sequence[Any] = ()) -> list[str]:
        """Greedy replies; ``logits_processor``: callables ``(input_ids, scores) -> scores`` applied at every step
        (the ``vcd`` strategy's contrast), as transformers' ``generate`` takes them."""
        from transformers import LogitsProcessorList

        inputs = self._inputs(queries)
        kwargs = self._model_kwargs(queries, inputs)
        output = self.model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     temperature=None, top_p=None, top_k=None,
                                     pad_token_id=self.tokenizer.pad_token_id,
                                     logits_processor=LogitsProcessorList(logits_processor))
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@dataclass
class Prefill:
    """Prompts run up to the reply: KV cache, attention mask (with holes), next real position per
    row, M-RoPE deltas (Qwen2-VL family), and the log-probabilities of the first reply token."""

    cache: Any
    mask: torch.Tensor
    next_position: torch.Tensor
    deltas: torch.Tensor | None
    last_logprobs: torch.Tensor


def _token_logprobs(logprobs: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Row t's log-probability of ``ids[t]``."""
    index = torch.tensor(list(ids), device=logprobs.device)
    return logprobs[torch.arange(len(index), device=logprobs.device), index]


def _left_pad(rows: list[torch.Tensor], value: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
    return ids, mask


@contextlib.contextmanager
def peft_deprecation_quiet():
    """Inside the block, the FutureWarning TRL and peft trigger by reading transformers' deprecated
    ``is_gradient_checkpointing`` is not shown: no setting of ours can change it, and it would print on every LoRA
    load and run. Scoped, so importing or using unconfuse leaves the process's warning filters as they were."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def merge_adapters(adapter_dir, base: str | None = None, dtype: Any = None):
    """The base model with the LoRA adapters of ``adapter_dir`` (a run's ``checkpoints/best``) merged in
    (peft's merge_and_unload), and the processor saved beside them (else the base's)."""
    from pathlib import Path

    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir = Path(adapter_dir)
    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForImageTextToText.from_pretrained(base, use_safetensors=True, **kwargs)
    with peft_deprecation_quiet():
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    processor = AutoProcessor.from_pretrained(str(adapter_dir) if (adapter_dir / "processor_config.json").exists() else base)
    return model, processor
