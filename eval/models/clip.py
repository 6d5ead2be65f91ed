"""Backends for CLIP-style encoders: open_clip (incl. ``hf-hub:`` BiomedCLIP and ``local-dir:``)
and transformers CLIP/SigLIP. Each unique image and each unique text is encoded once per pass."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .base import ModelLoadError, Query


class _EncoderCache:
    """Shared logic: cache normalised embeddings by image key / text, compute cosine similarities."""

    max_cached = 4096
    image_encoder_calls = 0

    def _init_cache(self) -> None:
        self._image_emb: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_emb: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_encoder_calls = 0

    def clear_cache(self, images: bool = True, texts: bool = True) -> None:
        """Forget the cached embeddings (of images, of texts, or both): stale once the weights change."""
        if images:
            self._image_emb.clear()
        if texts:
            self._text_emb.clear()

    def _encode_images(self, images: list[Any]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _put(cache: OrderedDict, keys: list[str], values: torch.Tensor) -> None:
        for key, value in zip(keys, torch.nn.functional.normalize(values.float(), dim=-1)):
            cache[key] = value

    @torch.no_grad()
    def encode_images(self, images: list[Any]) -> torch.Tensor:
        """Unit-norm image embeddings (float32, on CPU), uncached: for mining large corpora."""
        return torch.nn.functional.normalize(self._encode_images(images).float(), dim=-1).cpu()

    @torch.no_grad()
    def similarities(self, queries: list[Query], texts: list[tuple[str, ...]]) -> list[list[float]]:
        new_images: dict[str, Any] = {}
        for q in queries:
            if q.image_key not in self._image_emb:
                new_images.setdefault(q.image_key, q.image)
        if new_images:
            self._put(self._image_emb, list(new_images), self._encode_images(list(new_images.values())))
            self.image_encoder_calls += len(new_images)
        new_texts = list(dict.fromkeys(t for row in texts for t in row if t not in self._text_emb))
        if new_texts:
            self._put(self._text_emb, new_texts, self._encode_texts(new_texts))
        result = []
        for q, row in zip(queries, texts):
            image = self._image_emb[q.image_key]
            result.append([float(image @ self._text_emb[t]) for t in row])
        for cache in (self._image_emb, self._text_emb):
            while len(cache) > self.max_cached:
                cache.popitem(last=False)
        return result


class OpenClipBackend(_EncoderCache):
    """open_clip models: ``hf-hub:org/name``, ``local-dir:/path``, or an architecture name + ``pretrained`` tag."""

    def __init__(self, spec: str, *, name: str | None = None, pretrained: str | None = None, device: str | None = None,
                 model: Any = None, preprocess: Any = None, tokenizer: Any = None):
        import open_clip

        self.name = name or spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(spec, pretrained=pretrained)
                tokenizer = open_clip.get_tokenizer(spec)
            except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors alike
                raise ModelLoadError(f"cannot load open_clip model {self.name!r} ({spec}): {exc}. Offline "
                                     "(HF_HUB_OFFLINE=1) only cached or local-dir: models load.") from exc
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._init_cache()

    def _encode_images(self, images: list[Any]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        return self.model.encode_image(pixels)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class HFClipBackend(_EncoderCache):
    """transformers CLIP / SigLIP (anything with get_image_features and get_text_features)."""

    def __init__(self, model_path: str, *, name: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, model: Any = None, processor: Any = None):
        from transformers import AutoModel, AutoProcessor

        self.name = name or model_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.processor = processor or AutoProcessor.from_pretrained(
                model_path, trust_remote_code=trust_remote_code, revision=revision)
            model = model or AutoModel.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                       revision=revision, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {self.name!r} from {model_path!r}: {exc}. If it is a hub id, "
                                 "download it first or unset HF_HUB_OFFLINE.") from exc
        self.model = model.to(self.device).eval()
        # SigLIP was trained with max_length padding; CLIP pads to the longest text.
        self.text_padding = "max_length" if "siglip" in type(self.model).__name__.lower() else True
        self._init_cache()

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def _encode_images(self, images: list[Any]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        return self._tensor(self.model.get_image_features(**inputs))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=self.text_padding, truncation=True).to(self.device)
        return self._tensor(self.model.get_text_features(**inputs))


class HFVisionBackend(_EncoderCache):
    """An image-only transformers encoder (DINOv2 and other ViTs): the pooled output, else the
    first token of the last hidden state. Used by mining as encoder B; it has no text side."""

    def __init__(self, model_path: str, *, name: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None):
        from transformers import AutoImageProcessor, AutoModel

        self.name = name or model_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                                revision=revision)
            model = AutoModel.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision,
                                              use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {self.name!r} from {model_path!r}: {exc}") from exc
        self.model = model.to(self.device).eval()
        self._init_cache()

    def _encode_images(self, images: list[Any]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise ModelLoadError(f"{self.name} is an image-only encoder; it cannot score texts (use it for mining)")


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                             text_ids: torch.Tensor) -> torch.Tensor:
    """InfoNCE where identical texts in the batch are all positives of each other.

    Plain InfoNCE makes two images with the same caption ("CT of the head.") negatives of each
    other's text and cannot converge; soft targets spread over the equal texts instead.
    """
    logits = logit_scale * image_features @ text_features.T
    same = (text_ids[:, None] == text_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, targets)
                  + torch.nn.functional.cross_entropy(logits.T, targets))
