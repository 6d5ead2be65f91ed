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
    """Items 2k and 2k+1 are the two images of pair k, with the texts they should match.

    Images are decoded and preprocessed once (the datasets here are small: MediConfusion has
    228 images), so epochs cost only the model's time.
    """

    def __init__(self, bench: Benchmark, preprocess, text_mode: str = "option"):
        self.bench = bench
        self.texts = [item_text(p, s, text_mode) for p in bench.pairs for s in (1, 2)]
        cache: dict[str, torch.Tensor] = {}
        self.pixels = []
        for pair in bench.pairs:
            for side in (1, 2):
                ref = pair.image(side)
                if ref not in cache:
                    cache[ref] = preprocess(load_image(bench.resolve_image(ref)))
                self.pixels.append(cache[ref])

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixels[index], "text": self.texts[index], "item": index}


class PairBatches:
    """For ``transformers.Trainer`` subclasses (TRL's included): batches of whole pairs (dataset
    rows 2k and 2k+1 are a pair's two images), drawn by ``PairBatchSampler``."""

    def __init__(self, *args, pairs_per_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_per_batch = pairs_per_batch

    def get_train_dataloader(self) -> DataLoader:
        sampler = PairBatchSampler(len(self.train_dataset) // 2, self.pairs_per_batch, seed=self.args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=0)
        return self.accelerator.prepare(loader)


class PairBatchSampler(Sampler[list[int]]):
    """Batches of whole pairs: both images of a pair (items 2k, 2k+1) always share a batch.

    The pair order is a permutation drawn from ``seed + epoch``, so a resumed run sees the same
    batches. Under DDP, accelerate hands whole batches to ranks, so each rank gets whole pairs.
    """

    def __init__(self, n_pairs: int, pairs_per_batch: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if pairs_per_batch < 1:
            raise ValueError("pairs_per_batch must be at least 1")
        self.n_pairs, self.pairs_per_batch = n_pairs, pairs_per_batch
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.batch_size = 2 * pairs_per_batch  # accelerate reads it when sharding batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n_pairs) if self.shuffle \
            else np.arange(self.n_pairs)
        for batch in range(len(self)):
            chunk = order[batch * self.pairs_per_batch:(batch + 1) * self.pairs_per_batch]
            yield [int(i) for p in chunk for i in (2 * p, 2 * p + 1)]

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
    """

    def __init__(self, n_pairs: int, generations: int, pairs_per_generation: int, repeat_count: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if pairs_per_generation < 1 or generations < 1 or repeat_count < 1:
            raise ValueError("pairs_per_generation, generations and repeat_count must be at least 1")
        if n_pairs < pairs_per_generation:
            raise ValueError(f"{n_pairs} training pairs cannot fill one generation batch of {pairs_per_generation} pairs")
        self.n_pairs, self.generations, self.pairs_per_generation = n_pairs, generations, pairs_per_generation
        self.repeat_count, self.seed, self.shuffle = repeat_count, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n_pairs) if self.shuffle \
            else np.arange(self.n_pairs)
        for chunk in range(self.n_pairs // self.pairs_per_generation):
            pairs = order[chunk * self.pairs_per_generation:(chunk + 1) * self.pairs_per_generation]
            for _ in range(self.repeat_count):
                for p in pairs:
                    for item in (2 * int(p), 2 * int(p) + 1):
                        yield from [item] * self.generations

    def __len__(self) -> int:
        return (self.n_pairs // self.pairs_per_generation) * self.pairs_per_generation * 2 * self.generations * self.repeat_count


@dataclass
class ClipCollator:
    """Stacks pixels, tokenizes texts, and marks identical texts and pair partners in the batch."""

    tokenize: Any  # not named "tokenizer": Trainer would try to save_pretrained() it

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [it["text"] for it in items]
        unique = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        position = {it["item"]: k for k, it in enumerate(items)}
        partner = [position.get(it["item"] ^ 1, k) for k, it in enumerate(items)]  # 2k <-> 2k+1
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "input_ids": self.tokenize(texts),
            "text_ids": torch.tensor([unique[t] for t in texts]),
            "partner": torch.tensor(partner),
            "items": torch.tensor([it["item"] for it in items]),
        }
