"""What backends answer. Backends see images and prompts, never the metric."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from PIL import Image


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and what to do."""


@dataclass
class Query:
    """One question about one image. ``image_key`` identifies the image across queries so that
    a backend can encode it once per pass.

    Training-free strategies (``unconfuse.eval.strategies``) add two things: ``distort``, applied by the backend to
    the image's processed pixels (VCD's noised copy; its ``image_key`` differs from the clean image's), and
    ``references``, images shown before the question image, each followed by its text (retrieval's similar cases)."""

    image_key: str
    image: Image.Image
    prompt: str
    options: tuple[str, str] = ("", "")
    meta: dict[str, Any] = field(default_factory=dict)
    distort: Callable[[Any], Any] | None = None
    references: tuple[Reference, ...] = ()


@dataclass(frozen=True)
class Reference:
    """An image put before a query's own image, with the text that follows it in the prompt."""

    image_key: str
    image: Image.Image
    text: str


class GenerativeBackend(Protocol):
    """An image-text-to-text model (mc, greedy, prefix, freeform modes)."""

    name: str

    def next_token_scores(self, queries: list[Query], candidates: tuple[str, ...] = ("A", "B")) -> list[list[float]]:
        """Log-probabilities of each candidate's first token right after each prompt."""

    def continuation_scores(self, queries: list[Query], continuations: list[tuple[str, ...]]) -> list[list[float]]:
        """Mean token log-probability of each continuation as the assistant's reply to each prompt."""

    def generate(self, queries: list[Query], max_new_tokens: int) -> list[str]:
        """Greedy decoding of the reply to each prompt."""


class EncoderBackend(Protocol):
    """A CLIP-style image/text encoder (clip mode)."""

    name: str

    def similarities(self, queries: list[Query], texts: list[tuple[str, ...]]) -> list[list[float]]:
        """Cosine similarity of each query's image to each of its texts."""


def build_queries(rows) -> list[Query]:
    """A Query per ``(image path, prompt, options, meta)`` row; each image is decoded once, keyed by its normalised
    path (the same image reached through another split's folder, ``world/test/../images``, shares its entry)."""
    import os

    from ..images import load_image

    images: dict[str, Image.Image] = {}
    queries = []
    for path, prompt, options, meta in rows:
        key = os.path.normpath(path)
        if key not in images:
            images[key] = load_image(key)
        queries.append(Query(key, images[key], prompt, tuple(options), meta))
    return queries
