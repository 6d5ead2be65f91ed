"""What adapters answer. Adapters see images and prompts, never the metric."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and what to do."""


@dataclass
class Query:
    """One question about one image. ``image_key`` identifies the image across queries so that
    an adapter can encode it once per pass."""

    image_key: str
    image: Image.Image
    prompt: str
    options: tuple[str, str] = ("", "")
    meta: dict[str, Any] = field(default_factory=dict)


class GenerativeAdapter(Protocol):
    """An image-text-to-text model (mc, greedy, prefix, freeform modes)."""

    name: str

    def next_token_scores(self, queries: list[Query], candidates: tuple[str, ...] = ("A", "B")) -> list[list[float]]:
        """Log-probabilities of each candidate's first token right after each prompt."""

    def continuation_scores(self, queries: list[Query], continuations: list[tuple[str, ...]]) -> list[list[float]]:
        """Mean token log-probability of each continuation as the assistant's reply to each prompt."""

    def generate(self, queries: list[Query], max_new_tokens: int) -> list[str]:
        """Greedy decoding of the reply to each prompt."""


class EncoderAdapter(Protocol):
    """A CLIP-style image/text encoder (clip mode)."""

    name: str

    def similarities(self, queries: list[Query], texts: list[tuple[str, ...]]) -> list[list[float]]:
        """Cosine similarity of each query's image to each of its texts."""
