"""Training data from confusing pairs: (image, text) items and a sampler that keeps pairs whole."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from unconfuse.eval.images import load_image
from unconfuse.eval.pairs import Benchmark, Pair

TEXT_MODES = ("option", "question_option", "caption")


def item_text(pair: Pair, side: int, mode: str) -> str:
    """The text an image is trained to match: its correct option, the question and the option, or its caption."""
    option = pair.options["AB".index(pair.answer(side))]
    if mode == "option":
        return option
    if mode == "question_option":
        return f"{pair.question} {option}"
    if mode == "caption":
        text = pair.caption_1 if side == 1 else pair.caption_2
        if not text:
            raise ValueError(f"pair {pair.id} has no caption_{side}; use text: option")
        return text
    raise ValueError(f"text mode must be one of {', '.join(TEXT_MODES)}, got {mode!r}")


class PairItems(Dataset):
    """Items 2k and 2k+1 are the two images of pair k, with the texts they should match; then the replay
    items (image, caption), if any.

    Pair images are decoded and preprocessed once (the datasets here are small: MediConfusion has
    228 images), so epochs cost only the model's time; replay images on first use (a replay set can be large).
    """

    def __init__(self, bench: Benchmark, preprocess, text_mode: str = "option", replay: list[tuple[Any, str]] = ()):
        self.bench, self.preprocess = bench, preprocess
        self.texts = [item_text(p, s, text_mode) for p in bench.pairs for s in (1, 2)]
        cache: dict[str, torch.Tensor] = {}
        self.pixels = []
        for pair in bench.pairs:
            for side in (1, 2):
                ref = pair.image(side)
                if ref not in cache:
                    cache[ref] = preprocess(load_image(bench.resolve_image(ref)))
                self.pixels.append(cache[ref])
        self.pair_items = len(self.texts)
        self.replay = list(replay)
        self._replay_pixels: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.pair_items + len(self.replay)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < self.pair_items:
            return {"pixel_values": self.pixels[index], "text": self.texts[index], "item": index, "replay": False}
        path, text = self.replay[index - self.pair_items]
        if index not in self._replay_pixels:
            self._replay_pixels[index] = self.preprocess(load_image(path))
        return {"pixel_values": self._replay_pixels[index], "text": text, "item": index, "replay": True}


class PairBatches:
    """For ``transformers.Trainer`` subclasses (TRL's included): batches of whole pairs (dataset
    rows 2k and 2k+1 are a pair's two images), drawn by ``PairBatchSampler``, followed by
    ``replay_per_batch`` of the ``replay_items`` replay rows that come after the pair rows in the dataset.
    A trainer that sets ``count_pair_rows`` gets ``pair_rows`` (how many leading rows are pair rows) in
    every batch; the dataset's rows then carry ``replay`` (True for a replay row)."""

    count_pair_rows = False

    def __init__(self, *args, pairs_per_batch: int, replay_items: int = 0, replay_per_batch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_per_batch = pairs_per_batch
        self.replay_items, self.replay_per_batch = replay_items, replay_per_batch

    def get_train_dataloader(self) -> DataLoader:
        pair_items = len(self.train_dataset) - self.replay_items
        sampler = PairBatchSampler(pair_items // 2, self.pairs_per_batch, seed=self.args.seed,
                                   replay_items=self.replay_items, replay_per_batch=self.replay_per_batch)
        collate = self.data_collator
        if self.count_pair_rows:
            def collate(examples, collator=self.data_collator):
                pair_rows = sum(1 for example in examples if not example.get("replay"))
                return {**collator(examples), "pair_rows": torch.tensor(pair_rows)}
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
        return self.accelerator.prepare(loader)


def replay_stream(first: int, replay_items: int, seed: int, epoch: int) -> Iterator[int]:
    """Replay item indices (``first`` onwards) in turn from a permutation drawn from (``seed``, ``epoch``), drawn
    anew whenever it runs out; nothing when there are no replay items."""
    rng = np.random.default_rng([seed, epoch])
    while replay_items:
        yield from (first + int(i) for i in rng.permutation(replay_items))


class PairBatchSampler(Sampler[list[int]]):
    """Batches of whole pairs: both images of a pair (items 2k, 2k+1) always share a batch, followed by
    ``replay_per_batch`` replay items (items ``2 * n_pairs`` onwards), drawn in turn from a permutation of the
    ``replay_items`` that is drawn anew whenever it runs out.

    The pair order is a permutation drawn from ``seed + epoch`` (the replay order from ``seed``, ``epoch``),
    so a resumed run sees the same batches. Under DDP, accelerate hands whole batches to ranks, so each rank
    gets whole pairs.
    """

    def __init__(self, n_pairs: int, pairs_per_batch: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 replay_items: int = 0, replay_per_batch: int = 0):
        if pairs_per_batch < 1:
            raise ValueError("pairs_per_batch must be at least 1")
        if replay_per_batch and not replay_items:
            raise ValueError("replay_per_batch needs replay items")
        self.n_pairs, self.pairs_per_batch = n_pairs, pairs_per_batch
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.replay_items, self.replay_per_batch = replay_items, replay_per_batch
        self.epoch = 0
        self.batch_size = 2 * pairs_per_batch + replay_per_batch  # accelerate reads it when sharding batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n_pairs) if self.shuffle \
            else np.arange(self.n_pairs)
        replay = replay_stream(2 * self.n_pairs, self.replay_items, self.seed, self.epoch)
        for batch in range(len(self)):
            chunk = order[batch * self.pairs_per_batch:(batch + 1) * self.pairs_per_batch]
            yield [int(i) for p in chunk for i in (2 * p, 2 * p + 1)] + [next(replay) for _ in range(self.replay_per_batch)]

    def __len__(self) -> int:
        full = self.n_pairs // self.pairs_per_batch
        return full if self.drop_last else math.ceil(self.n_pairs / self.pairs_per_batch)


class PairRepeatSampler(Sampler[int]):
    """TRL GRPO's ``RepeatSampler`` over whole pairs: every generation batch holds both images of its pairs.

    The stream has TRL's layout: a chunk of ``pairs_per_generation`` pairs, each pair as ``generations`` copies
    of item 2p then ``generations`` copies of item 2p+1 (one group of rollouts per image, partner groups side
    by side), the chunk repeated ``repeat_count`` times (once per step that reads that generation batch); a last,
    incomplete chunk is dropped. Cut into consecutive slices of a multiple of ``2 * generations`` rows (one per
    process, as accelerate hands out batches), every slice holds whole pairs. The pair order is drawn from
    ``seed + epoch``, so a resumed run sees the same batches.

    With replay, a chunk is made of units (one device batch each): ``pairs_per_unit`` pairs followed by
    ``replay_per_unit`` replay items (items ``2 * n_pairs`` onwards, drawn in turn from a permutation drawn
    anew whenever it runs out), each with its ``generations`` rollouts; slices of whole units hold whole pairs.
    """

    def __init__(self, n_pairs: int, generations: int, pairs_per_generation: int, repeat_count: int = 1,
                 seed: int = 0, shuffle: bool = True, replay_items: int = 0, replay_per_unit: int = 0,
                 pairs_per_unit: int | None = None):
        if pairs_per_generation < 1 or generations < 1 or repeat_count < 1:
            raise ValueError("pairs_per_generation, generations and repeat_count must be at least 1")
        if n_pairs < pairs_per_generation:
            raise ValueError(f"{n_pairs} training pairs cannot fill one generation batch of {pairs_per_generation} pairs")
        pairs_per_unit = pairs_per_unit or pairs_per_generation
        if pairs_per_generation % pairs_per_unit:
            raise ValueError(f"a generation batch of {pairs_per_generation} pairs is not whole units of {pairs_per_unit}")
        if replay_per_unit and not replay_items:
            raise ValueError("replay_per_unit needs replay items")
        self.n_pairs, self.generations, self.pairs_per_generation = n_pairs, generations, pairs_per_generation
        self.repeat_count, self.seed, self.shuffle = repeat_count, seed, shuffle
        self.replay_items, self.replay_per_unit, self.pairs_per_unit = replay_items, replay_per_unit, pairs_per_unit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n_pairs) if self.shuffle \
            else np.arange(self.n_pairs)
        replay = replay_stream(2 * self.n_pairs, self.replay_items, self.seed, self.epoch)
        for chunk in range(self.n_pairs // self.pairs_per_generation):
            pairs = order[chunk * self.pairs_per_generation:(chunk + 1) * self.pairs_per_generation]
            items = []
            for unit in range(0, len(pairs), self.pairs_per_unit):
                items += [item for p in pairs[unit:unit + self.pairs_per_unit] for item in (2 * int(p), 2 * int(p) + 1)]
                items += [next(replay) for _ in range(self.replay_per_unit)]
            for _ in range(self.repeat_count):
                for item in items:
                    yield from [item] * self.generations

    def __len__(self) -> int:
        chunks = self.n_pairs // self.pairs_per_generation
        units = self.pairs_per_generation // self.pairs_per_unit
        per_chunk = 2 * self.pairs_per_generation + units * self.replay_per_unit
        return chunks * per_chunk * self.generations * self.repeat_count


@dataclass
class ClipCollator:
    """Stacks pixels, tokenizes texts, and marks identical texts, pair partners (a replay item, or an image whose
    partner is not in the batch, is its own) and replay items in the batch."""

    tokenize: Any  # not named "tokenizer": Trainer would try to save_pretrained() it

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [it["text"] for it in items]
        unique = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        position = {it["item"]: k for k, it in enumerate(items) if not it.get("replay")}
        partner = [k if it.get("replay") else position.get(it["item"] ^ 1, k) for k, it in enumerate(items)]  # 2k <-> 2k+1
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "input_ids": self.tokenize(texts),
            "text_ids": torch.tensor([unique[t] for t in texts]),
            "partner": torch.tensor(partner),
            "items": torch.tensor([it["item"] for it in items]),
            "replay": torch.tensor([bool(it.get("replay")) for it in items]),
        }
