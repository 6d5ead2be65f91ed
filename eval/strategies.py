"""Training-free strategies: what changes how a model is asked or how its answer is read, with no weight changed.

``unconfuse eval --strategy NAME [--strategy-option k=v ...]`` scores the same pairs, with the same scorer, as a
plain evaluation, so a training-free strategy lands in the same ``compare`` table and on the same set accuracy vs
retention plot as a training recipe. Each strategy wraps a backend (``apply_strategy``) and answers the backend's
three questions (next-token scores, option scores, generation) its own way, so eval's modes and retention's
questions run under it unchanged:

- ``vcd``: visual contrastive decoding (Leng et al., CVPR 2024, arXiv 2311.16922). Every score is
  ``(1 + alpha) * log p(. | image) - alpha * log p(. | distorted image)``, the distorted image being the processed
  pixels noised as VCD's forward diffusion at ``noise_step`` of 1000 (noise fixed by the image's pixels and
  ``seed``). The adaptive plausibility cutoff keeps only what the plain model finds plausible: in generation
  (mc, freeform) the tokens whose probability is at least ``cutoff`` times the most likely token's, as VCD; in the
  scored modes (greedy, prefix) the options whose plain probability is at least ``cutoff`` times the best
  option's (a cut option's score is -inf: it cannot win). The distorted copies are batched beside the clean
  images and their features cached like theirs. ``alpha: 0`` is plain scoring, exactly (one pass).
- ``describe``: describe-then-answer. A first greedy pass writes a short description of each image (once per
  image), the second asks the mode's prompt with the description before it; both passes are in the predictions.
- ``retrieve``: DoubleTake-style contrast (arXiv 2602.02894; no public code): the ``k`` corpus images most similar
  to the question's image (cosine of ``encoder`` embeddings, cached as ``unconfuse mine`` caches them) are put
  before it with their captions, in one multi-image prompt. A corpus holding an image of the benchmark (by path,
  bytes or pixels) or of the retention set is refused: that reference would carry the answer.

A strategy's name, options and prompt version are in the evaluation's fingerprint and its ``results.json``
(``strategy``); each prediction record holds what the strategy saw (``strategy``: plain and distorted scores,
the description pass, the references). This module imports neither torch nor transformers at import time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models.base import Query, Reference
from .prompts import load_prompts

STRATEGY_PROMPTS = "strategies-v1"


class StrategyError(ValueError):
    """A strategy or option that cannot apply; the message names it (exit 2)."""


@dataclass(frozen=True)
class Option:
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None


# name -> its options; option values come from --strategy-option key=value
STRATEGIES: dict[str, dict[str, Option]] = {
    "plain": {},
    "vcd": {
        "alpha": Option(float, 1.0, "contrast strength (VCD's cd_alpha); 0 is plain scoring", 0.0, None),
        "cutoff": Option(float, 0.1, "adaptive plausibility cutoff (VCD's cd_beta); 0 keeps every token and option",
                         0.0, 1.0),
        "noise_step": Option(int, 500, "diffusion noise step of the distorted image (0 to 999)", 0, 999),
        "seed": Option(int, 0, "seed of the noise (with each image's pixels)", 0, None),
    },
    "describe": {
        "max_new_tokens": Option(int, 64, "length of the description", 1, 1024),
    },
    "retrieve": {
        "corpus": Option(str, None, "reference corpus: a JSONL of {image, caption}, a captioned folder or hf:<id> "
                                    "(as unconfuse mine reads); world:corpus is the embedded world's"),
        "k": Option(int, 2, "reference images per question", 1, 16),
        "encoder": Option(str, "biomedclip", "image encoder that finds the most similar corpus images "
                                             "(a preset, folder or hub id)"),
    },
}
LABEL_SKIPS = ("seed", "corpus")  # options that do not name a strategy in compare (seeds group; paths are long)


@dataclass(frozen=True)
class Strategy:
    """A training-free strategy with every option filled (defaults where none was given)."""

    name: str = "plain"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def plain(self) -> bool:
        return self.name == "plain"

    @property
    def seed(self) -> int | None:
        return self.options.get("seed")

    def label(self) -> str:
        """How compare names it: ``vcd``, or ``vcd alpha=0.5`` where options differ from their defaults."""
        changed = [f"{k}={v}" for k, v in self.options.items()
                   if k not in LABEL_SKIPS and v != STRATEGIES[self.name][k].default]
        return " ".join([self.name, *changed])

    def record(self) -> dict[str, Any]:
        """What run.json, the fingerprint and results.json hold: name, options and the prompts' version."""
        out: dict[str, Any] = {"name": self.name, "options": dict(self.options)}
        if self.name in ("describe", "retrieve"):
            out["prompts"] = STRATEGY_PROMPTS
        return out


def parse_strategy(name: str, options: list[str] | tuple[str, ...] | None = ()) -> Strategy:
    """A Strategy from ``--strategy NAME`` and its ``--strategy-option key=value`` texts; a bad name, key or value is
    a StrategyError naming it."""
    if name not in STRATEGIES:
        raise StrategyError(f"--strategy {name!r}: unknown; strategies: {', '.join(STRATEGIES)}")
    known = STRATEGIES[name]
    values: dict[str, Any] = {}
    for text in options or ():
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise StrategyError(f"--strategy-option {text!r}: key=value is needed")
        if key not in known:
            have = ", ".join(known) or "none"
            raise StrategyError(f"--strategy-option {text!r}: strategy {name} has no option {key!r} (its options: {have})")
        option = known[key]
        try:
            value = option.kind(raw)
        except ValueError:
            raise StrategyError(f"--strategy-option {text!r}: {key} needs {'an integer' if option.kind is int else 'a number' if option.kind is float else 'a value'}") from None
        if option.kind is float and not math.isfinite(value):
            raise StrategyError(f"--strategy-option {text!r}: {key} must be a finite number")
        if (option.low is not None and value < option.low) or (option.high is not None and value > option.high):
            span = f"at least {option.low}" if option.high is None else f"between {option.low} and {option.high}"
            raise StrategyError(f"--strategy-option {text!r}: {key} must be {span}")
        if option.kind is str and not value:
            raise StrategyError(f"--strategy-option {text!r}: {key} needs a value")
        values[key] = value
    filled = {k: values.get(k, option.default) for k, option in known.items()}
    missing = [k for k, v in filled.items() if v is None]
    if missing:
        raise StrategyError(f"--strategy {name} needs --strategy-option {missing[0]}=... ({known[missing[0]].help})")
    return Strategy(name, filled)


def strategy_from_record(record: dict[str, Any] | None) -> Strategy:
    """The Strategy a run.json or results.json names (plain where it names none)."""
    if not record:
        return Strategy()
    return Strategy(record["name"], dict(record.get("options") or {}))


# ---------------------------------------------------------------------------------------------
# Checks before any model loads


def check_strategy(strategy: Strategy, mode: str, is_encoder: bool, bench=None, retention=None) -> dict[str, Any] | None:
    """Refuse what cannot apply: a strategy on an encoder (clip mode), a retrieve corpus that is missing, unreadable
    or holds an image of ``bench`` or of the ``retention`` set. Returns the corpus audit (retrieve) or None."""
    if strategy.plain:
        return None
    if is_encoder or mode == "clip":
        raise StrategyError(f"--strategy {strategy.name} changes how an image-text-to-text model answers "
                            "(modes mc, greedy, prefix, freeform); an encoder in clip mode has no decoding to change")
    if strategy.name != "retrieve":
        return None
    items = corpus_items(strategy.options["corpus"])
    return audit_corpus(strategy.options["corpus"], items, bench, retention)


def corpus_items(corpus: str) -> list:
    """The retrieve corpus's records (``unconfuse mine``'s loader), every image present."""
    from .home import default_world_root
    from .tools.mining import MiningError, load_corpus

    try:  # world:corpus: the embedded world's image-caption corpus (renders of its train-split images)
        items = load_corpus(str(default_world_root() / "corpus.jsonl") if corpus == "world:corpus" else corpus)
    except MiningError as exc:
        raise StrategyError(f"retrieve corpus: {exc}") from None
    if not items:
        raise StrategyError(f"retrieve corpus {corpus}: no records")
    missing = next((item.path for item in items if not item.path.is_file()), None)
    if missing is not None:
        raise StrategyError(f"retrieve corpus {corpus}: image {missing} not found")
    return items


def audit_corpus(corpus: str, items: list, bench=None, retention=None) -> dict[str, Any]:
    """The leakage audit of the corpus against the benchmark's (and the retention set's) images; a shared image
    (path, bytes or pixels) is refused, naming it."""
    from .leakage import leakage_audit
    from .retention import RetentionItem, RetentionSet

    corpus_set = RetentionSet([RetentionItem(str(i), str(item.path.resolve()), caption=item.caption)
                               for i, item in enumerate(items)], Path("/"), corpus)
    others = {name: source for name, source in (("benchmark", bench), ("retention", retention)) if source is not None}
    report = leakage_audit(corpus_set, others)
    for name, split in report["splits"].items():
        shared = split["shared_by_id"] + split["shared_by_content"] + split["shared_by_pixels"]
        if shared:
            raise StrategyError(f"retrieve corpus {corpus}: holds {len(shared)} image(s) of the {name} "
                                f"(e.g. {shared[0]}): a reference would carry its answer; remove them from the corpus")
    return report


# ---------------------------------------------------------------------------------------------
# Backends under a strategy


def apply_strategy(backend, strategy: Strategy, device: str | None = None):
    """``backend`` answering under ``strategy`` (itself for plain, and for vcd with alpha 0)."""
    if strategy.plain or (strategy.name == "vcd" and strategy.options["alpha"] == 0):
        return backend
    if not hasattr(backend, "generate"):
        raise StrategyError(f"--strategy {strategy.name}: {getattr(backend, 'name', 'this model')} is an encoder; "
                            "strategies change how an image-text-to-text model answers")
    o = strategy.options
    if strategy.name == "vcd":
        return ContrastiveDecoding(backend, o["alpha"], o["cutoff"], o["noise_step"], o["seed"])
    if strategy.name == "describe":
        return DescribeFirst(backend, o["max_new_tokens"])
    return RetrieveReferences(backend, o["corpus"], o["k"], o["encoder"], device)


class StrategyBackend:
    """A backend answering under a strategy: the inner backend's attributes show through (``model``, ``name``),
    and ``last_notes`` holds, per query of the last call, what the strategy saw (prediction records keep it)."""

    def __init__(self, inner):
        self.inner = inner
        self.last_notes: list[dict[str, Any]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class ContrastiveDecoding(StrategyBackend):
    """Visual contrastive decoding over an image-text-to-text backend (see the module docstring)."""

    def __init__(self, inner, alpha: float, cutoff: float, noise_step: int, seed: int):
        super().__init__(inner)
        self.alpha, self.cutoff = alpha, cutoff
        self.noise = DiffusionNoise(noise_step, seed)

    def _distorted(self, queries: list[Query]) -> list[Query]:
        suffix = f"#vcd-noise-{self.noise.step}-seed-{self.noise.seed}"  # cached apart from the clean image
        return [dataclasses.replace(q, image_key=q.image_key + suffix, distort=self.noise) for q in queries]

    def _contrast(self, clean: list[list[float]], noisy: list[list[float]]) -> list[list[float]]:
        import torch

        self.last_notes = [{"plain_scores": c, "distorted_scores": n} for c, n in zip(clean, noisy)]
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731  (Python floats are float64)
        return contrast(as_tensor(clean), as_tensor(noisy), self.alpha, self.cutoff).tolist()

    def next_token_scores(self, queries, candidates=("A", "B")):
        both = self.inner.next_token_scores(queries + self._distorted(queries), candidates)
        return self._contrast(both[:len(queries)], both[len(queries):])

    def continuation_scores(self, queries, continuations):
        both = self.inner.continuation_scores(queries + self._distorted(queries), list(continuations) * 2)
        return self._contrast(both[:len(queries)], both[len(queries):])

    def generate(self, queries, max_new_tokens):
        n = len(queries)
        texts = self.inner.generate(queries + self._distorted(queries), max_new_tokens,
                                    logits_processor=[VisualContrast(n, self.alpha, self.cutoff)])
        self.last_notes = [{} for _ in queries]
        return texts[:n]


@dataclass(frozen=True)
class DiffusionNoise:
    """VCD's distortion: the forward diffusion ``q(x_t | x_0)`` at ``step`` of a 1000-step schedule (betas a sigmoid
    from 1e-5 to 5e-3, as VCD's ``add_diffusion_noise``) on the processed (normalised) pixels. The noise is drawn
    on the CPU from a generator seeded by the pixels' bytes and ``seed``: the same image gets the same noise in any
    batch, on any device."""

    step: int
    seed: int

    def __call__(self, pixels):
        import torch

        betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
        keep = float(torch.cumprod(1 - betas, 0)[self.step])
        x = pixels.detach().float().cpu()
        digest = hashlib.sha256(x.numpy().tobytes() + f"/{self.seed}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        noise = torch.randn(x.shape, generator=generator)
        return (math.sqrt(keep) * x + math.sqrt(1 - keep) * noise).to(device=pixels.device, dtype=pixels.dtype)


class VisualContrast:
    """A logits processor for ``generate`` over a batch of ``n`` clean rows followed by their ``n`` distorted twins:
    every row gets the contrasted, plausibility-cut log-probabilities of its clean row, so greedy decoding picks the
    same token for both and the distorted rows follow the clean text, as VCD decodes."""

    def __init__(self, n: int, alpha: float, cutoff: float):
        self.n, self.alpha, self.cutoff = n, alpha, cutoff

    def __call__(self, input_ids, scores):
        import torch

        clean = torch.log_softmax(scores[:self.n].float(), dim=-1)
        noisy = torch.log_softmax(scores[self.n:].float(), dim=-1)
        contrasted = contrast(clean, noisy, self.alpha, self.cutoff)
        return torch.cat([contrasted, contrasted]).to(scores.dtype)


def contrast(clean, noisy, alpha: float, cutoff: float):
    """VCD's contrast of log-probability tensors along the last axis: ``(1 + alpha) * clean - alpha * noisy``, -inf
    where ``clean`` is below ``log(cutoff)`` plus the row's best (the adaptive plausibility cutoff; 0 cuts nothing).
    One formula for the vocabulary at a generated token and for a mode's options."""
    out = (1 + alpha) * clean - alpha * noisy
    if cutoff > 0:
        floor = clean.max(dim=-1, keepdim=True).values + math.log(cutoff)
        out = out.masked_fill(clean < floor, -math.inf)
    return out


class RewrittenQueries(StrategyBackend):
    """A strategy that asks each question another way (``_answering``: the queries as the inner backend gets them)."""

    def _answering(self, queries: list[Query]) -> list[Query]:
        raise NotImplementedError

    def next_token_scores(self, queries, candidates=("A", "B")):
        return self.inner.next_token_scores(self._answering(queries), candidates)

    def continuation_scores(self, queries, continuations):
        return self.inner.continuation_scores(self._answering(queries), continuations)

    def generate(self, queries, max_new_tokens):
        return self.inner.generate(self._answering(queries), max_new_tokens)


class DescribeFirst(RewrittenQueries):
    """Describe-then-answer: one description per image (greedy, ``max_new_tokens``), then the question with it."""

    def __init__(self, inner, max_new_tokens: int):
        super().__init__(inner)
        prompts = load_prompts(STRATEGY_PROMPTS).data["describe"]
        self.describe_prompt, self.answer_template = prompts["prompt"], prompts["answer"]
        self.max_new_tokens = max_new_tokens
        self.descriptions: dict[str, str] = {}

    def _answering(self, queries: list[Query]) -> list[Query]:
        todo = {q.image_key: q for q in queries if q.image_key not in self.descriptions}
        if todo:
            asks = [Query(key, q.image, self.describe_prompt, distort=q.distort) for key, q in todo.items()]
            for key, text in zip(todo, self.inner.generate(asks, self.max_new_tokens)):
                self.descriptions[key] = text.strip()
        rewritten = [dataclasses.replace(q, prompt=self.answer_template.format(
            description=self.descriptions[q.image_key], prompt=q.prompt)) for q in queries]
        self.last_notes = [{"passes": [{"pass": "describe", "prompt": self.describe_prompt,
                                        "reply": self.descriptions[q.image_key]},
                                       {"pass": "answer", "prompt": r.prompt}]} for q, r in zip(queries, rewritten)]
        return rewritten


class RetrieveReferences(RewrittenQueries):
    """The ``k`` most similar corpus images, with their captions, before each question's image."""

    def __init__(self, inner, corpus: str, k: int, encoder: str, device: str | None = None):
        import numpy as np

        from .io import sha256_file
        from .tools.mining import Encoder

        super().__init__(inner)
        prompts = load_prompts(STRATEGY_PROMPTS).data["retrieve"]
        self.reference_template, self.answer_template = prompts["reference"], prompts["answer"]
        self.items = corpus_items(corpus)
        self.k = min(k, len(self.items))
        self.encoder = Encoder(encoder, device=device, num_workers=0)
        hashes = [sha256_file(item.path) for item in self.items]
        self.encoder.embed(hashes, [item.path for item in self.items])
        self.matrix = np.asarray(self.encoder.matrix(hashes), dtype=np.float32)
        self.neighbours: dict[str, list[tuple[int, float]]] = {}
        self._images: dict[int, Any] = {}

    def _nearest(self, queries: list[Query]) -> None:
        import numpy as np

        todo = {q.image_key: q.image for q in queries if q.image_key not in self.neighbours}
        if not todo:
            return
        vectors = np.asarray(self.encoder.backend.encode_images(list(todo.values())), dtype=np.float32)
        sims = vectors @ self.matrix.T
        for key, row in zip(todo, sims):
            top = np.argsort(-row, kind="stable")[:self.k]
            self.neighbours[key] = [(int(i), float(row[i])) for i in top]

    def _image(self, index: int):
        from .images import load_image

        if index not in self._images:
            self._images[index] = load_image(self.items[index].path)
        return self._images[index]

    def _answering(self, queries: list[Query]) -> list[Query]:
        self._nearest(queries)
        rewritten, self.last_notes = [], []
        for q in queries:
            near = self.neighbours[q.image_key]
            refs = tuple(Reference(str(self.items[i].path), self._image(i), self.reference_template.format(
                index=n + 1, caption=self.items[i].caption)) for n, (i, _) in enumerate(near))
            rewritten.append(dataclasses.replace(q, prompt=self.answer_template.format(prompt=q.prompt), references=refs))
            self.last_notes.append({"references": [{"image": str(self.items[i].path), "caption": self.items[i].caption,
                                                    "similarity": sim} for i, sim in near]})
        return rewritten
