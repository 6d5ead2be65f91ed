"""``unconfuse mine``: confusing pairs from an image-caption corpus, by MediConfusion's own rule.

MediConfusion's pairs are images that a CLIP-style encoder finds nearly identical (BiomedCLIP
cosine >= 0.9) while a vision-only self-supervised model sees them as different (DINOv2 cosine
0.33-0.74). Mining applies that rule to a corpus:

1. embed every corpus image with encoder A (the kind of model being fixed) and encoder B (vision
   only), images decoded by DataLoader workers; embeddings are cached per model and image content
   hash in shards written as they fill, so reruns, killed runs and larger corpora only embed new
   images;
2. drop every image of the excluded benchmarks and its near-duplicates (same bytes, perceptual
   hash within a distance, or encoder-B cosine above a threshold), counted in ``mining.json``;
3. search all pairs with cos(A) >= min_sim_a on memory-mapped embeddings (never an N x N matrix,
   never all embeddings in memory): exactly in tiles (numpy, or faiss range search), or above
   ``ivf_above`` images approximately with a faiss IVF index whose recall against the exact search
   is measured on sampled images and recorded; keep those with cos(B) <= max_sim_b and different
   captions;
4. keep the most confusing first (largest cos(A) - cos(B)), each image in at most
   ``max_pairs_per_image`` pairs;
5. write ``pairs.jsonl``: caption-only records ("Which caption describes this image?" with the two
   captions as the options, valid pairs for the encoder recipe and the scorer), or, with
   ``make_questions``, one question with two options per pair written by an OpenAI-compatible LLM.
"""
from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from unconfuse.eval.folders import owned_folder
from unconfuse.eval.home import unconfuse_home
from unconfuse.eval.io import atomic_write_json, atomic_writer, sha256_file
from unconfuse.eval.leakage import min_hamming, phash_rows
from unconfuse.eval.pairs import Pair, write_jsonl

CAPTION_QUESTION = "Which caption describes this image?"
QUESTION_PROMPTS = Path(__file__).resolve().parents[1] / "prompts" / "make-questions-v1.yaml"
SHARD_SIZE = 8192  # embeddings per cache shard (16 MiB at 512-d): the most a kill can lose


class MiningError(ValueError):
    """Bad corpus or settings; the message names the file, row or key."""


@dataclass
class MiningConfig:
    """Settings of ``unconfuse mine``; the command line's options are made from these fields."""

    corpus: str = field(metadata={"help": "JSONL of {image, caption}, a ROCO-style folder, or hf:<dataset id>"})
    out: str = field(metadata={"help": "folder for pairs.jsonl and mining.json"})
    encoder_a: str = field(default="biomedclip", metadata={
        "help": "the kind of encoder being fixed (default biomedclip)"})
    encoder_b: str = field(default="dinov2-base", metadata={"help": "vision-only encoder (default dinov2-base)"})
    min_sim_a: float = field(default=0.9, metadata={"help": "smallest encoder-A cosine of a pair (alike)"})
    max_sim_b: float = field(default=0.75, metadata={"help": "largest encoder-B cosine of a pair (apart)"})
    max_pairs_per_image: int = field(default=3, metadata={"help": "pairs an image takes part in, at most"})
    exclude: list[str] | None = field(default=None, metadata={
        "help": "benchmarks whose images (and near-duplicates) never enter a pair (default: mediconfusion when downloaded)",
        "metavar": "BENCHMARK"})
    dedup_phash_distance: int = field(default=4, metadata={
        "help": "perceptual-hash Hamming distance that counts as a near-duplicate"})
    dedup_sim_b: float = field(default=0.95, metadata={"help": "encoder-B cosine that counts as a near-duplicate"})
    block_size: int = field(default=4096, metadata={"help": "images per block of the pair search"})
    batch_size: int = field(default=64, metadata={"help": "images per embedding batch"})
    search: Literal["auto", "numpy", "faiss", "ivf"] = field(default="auto", metadata={
        "help": "pair search: numpy or faiss (exact, in tiles), ivf (approximate: faiss IVF index, recall measured "
                "and recorded), or auto (ivf above --ivf-above images, else faiss when installed, else numpy)"})
    ivf_above: int = field(default=200_000, metadata={"help": "images above which --search auto runs ivf"})
    ivf_nlist: int = field(default=0, metadata={"help": "inverted lists of the ivf index (0: about 2 sqrt(images))"})
    ivf_nprobe: int = field(default=8, metadata={
        "help": "lists each image is searched in (more: higher recall, slower)"})
    num_workers: int | None = field(default=None, metadata={
        "help": "image-decoding DataLoader worker processes (default: min(4, CPUs); 0 decodes in the main process)"})
    shard_size: int = field(default=SHARD_SIZE, metadata={
        "help": "embeddings per cache shard, each written when full (a kill loses at most one)"})
    make_questions: bool = field(default=False, metadata={
        "help": "have an LLM write one question per pair from the captions"})
    llm_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible endpoint (key from UNCONFUSE_JUDGE_API_KEY or OPENAI_API_KEY)"})
    llm_model: str | None = field(default=None, metadata={"help": "LLM model name for --make-questions"})
    seed: int = field(default=0, metadata={"help": "seed of the option order"})
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu (default: cuda when available)"})
    force: bool = field(default=False, metadata={
        "help": "start afresh in an --out that holds another mining run (its contents are moved aside, not deleted)"})


@dataclass
class CorpusItem:
    path: Path
    caption: str
    categories: list[str] = field(default_factory=list)


# -- corpora ------------------------------------------------------------------------------------

def _jsonl_corpus(path: Path) -> Iterator[CorpusItem]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MiningError(f"{path}: line {lineno}: not JSON ({exc.msg})") from exc
            for key in ("image", "caption"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise MiningError(f"{path}: line {lineno}: missing or empty {key!r}")
            image = Path(rec["image"])
            yield CorpusItem(image if image.is_absolute() else path.parent / image, rec["caption"].strip(),
                             list(rec.get("categories") or []))


ID_COLUMNS = ("image", "name", "file_name", "filename", "ID", "id")
CAPTION_COLUMNS = ("caption", "Caption", "text")


def _csv_corpus(folder: Path) -> Iterator[CorpusItem]:
    """ROCO-style: captions in CSV files (ROCO: id,name,caption; ROCOv2: ID,Caption), images in the
    folder, an images/ subfolder or a folder named like the CSV's split."""
    found = False
    for table in sorted(folder.glob("*.csv")):
        with open(table, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            id_col = next((c for c in ID_COLUMNS if c in columns), None)
            cap_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
            if id_col is None or cap_col is None:
                continue
            found = True
            split = table.stem.split("_")[0]
            for row_no, row in enumerate(reader, start=2):
                name, caption = (row.get(id_col) or "").strip(), (row.get(cap_col) or "").strip()
                if not name or not caption:
                    raise MiningError(f"{table}: row {row_no}: empty {id_col if not name else cap_col!r}")
                candidates = [folder / name, folder / "images" / name, folder / split / name]
                if not Path(name).suffix:
                    candidates = [c.with_name(c.name + ext) for c in candidates for ext in (".jpg", ".png", ".jpeg")]
                path = next((c for c in candidates if c.exists()), candidates[0])
                yield CorpusItem(path, caption)
    if not found:
        raise MiningError(f"{folder}: no corpus.jsonl and no CSV with an image column ({', '.join(ID_COLUMNS)}) "
                          f"and a caption column ({', '.join(CAPTION_COLUMNS)})")


def _hf_corpus(name: str) -> Iterator[CorpusItem]:
    """A Hugging Face dataset (``hf:<id>`` or a save_to_disk folder) with image and caption columns;
    images are exported once by content hash, like benchmark images."""
    from datasets import load_dataset, load_from_disk

    from unconfuse.eval.pairs import _export_image

    path = Path(name)
    data = load_from_disk(str(path)) if path.is_dir() else load_dataset(name)
    if hasattr(data, "keys"):  # a DatasetDict: the train split, else the first
        data = data["train"] if "train" in data else data[next(iter(data.keys()))]
    cap_col = next((c for c in CAPTION_COLUMNS if c in data.column_names), None)
    if "image" not in data.column_names or cap_col is None:
        raise MiningError(f"{name}: a corpus dataset needs an 'image' and a caption column "
                          f"({', '.join(CAPTION_COLUMNS)}); it has {', '.join(data.column_names)}")
    cache = unconfuse_home() / "images"
    for row in data:
        yield CorpusItem(_export_image(row["image"], cache), str(row[cap_col]).strip())


def load_corpus(arg: str) -> list[CorpusItem]:
    """A JSONL of {image, caption}, a folder (corpus.jsonl, or ROCO-style CSV + images), or a
    Hugging Face dataset (``hf:<id>`` or a ``save_to_disk`` folder)."""
    if arg.startswith("hf:"):
        return list(_hf_corpus(arg[3:]))
    path = Path(arg).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise MiningError(f"{path}: a corpus file must be JSONL of {{image, caption}} records")
        return list(_jsonl_corpus(path))
    if path.is_dir():
        if (path / "corpus.jsonl").exists():
            return list(_jsonl_corpus(path / "corpus.jsonl"))
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return list(_hf_corpus(str(path)))
        return list(_csv_corpus(path))
    raise MiningError(f"corpus {arg!r} not found: give a JSONL file, a folder or hf:<dataset id>")


# -- embeddings -----------------------------------------------------------------------------------

GATHER_ROWS = 16384  # rows copied at a time when a matrix is assembled from the shards


class DecodedImages:
    """The images at ``paths`` for a DataLoader: item k is (k, image, None), or (k, None, reason)
    when the file does not decode (recorded by the caller, never fatal in a worker)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> tuple[int, Any, str | None]:
        from unconfuse.eval.images import UnreadableImage, decode_image

        try:
            return k, decode_image(self.paths[k]), None
        except UnreadableImage as exc:
            return k, None, str(exc)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with atomic_writer(path) as fh:
        np.save(fh, array)


class EmbeddingCache:
    """Unit-norm float32 image embeddings of one model, by image content hash, in shards under
    ``root/<model key>/``: ``shard-<id>.vectors.npy`` (rows) and ``shard-<id>.hashes.npy`` (the rows'
    hashes). A shard is written as soon as ``shard_size`` new embeddings exist, each file atomically,
    hashes last (a shard counts once its hashes exist), so a kill loses at most the shard in
    progress. Shards are read through ``np.load(mmap_mode="r")``: only the hashes are held in memory."""

    def __init__(self, root: Path, model_key: str, shard_size: int = SHARD_SIZE):
        if shard_size < 1:
            raise MiningError(f"shard size must be at least 1, got {shard_size}")
        self.folder = root / model_key
        self.shard_size = shard_size
        self._load_index()

    # the index: every cached hash, sorted, with its shard and row (numpy, not a dict: 1.6M hashes
    # are ~100 MB this way, several times that as Python strings in a dict)
    def _load_index(self) -> None:
        self.shards: list[Path] = []
        keys, shard_ids, rows = [], [], []
        self.dim: int | None = None
        for hashes_file in sorted(self.folder.glob("shard-*.hashes.npy")):
            vectors_file = hashes_file.with_name(hashes_file.name.replace(".hashes.npy", ".vectors.npy"))
            hashes = np.load(hashes_file)
            shape = np.load(vectors_file, mmap_mode="r").shape  # reads the header only
            if len(shape) != 2 or shape[0] != len(hashes) or (self.dim is not None and shape[1] != self.dim):
                raise MiningError(f"{vectors_file}: {shape} does not match its {len(hashes)} hashes or the "
                                  f"other shards' dimension {self.dim}; delete the shard to re-embed its images")
            self.dim = shape[1]
            keys.append(hashes)
            shard_ids.append(np.full(len(hashes), len(self.shards), np.int32))
            rows.append(np.arange(len(hashes), dtype=np.int32))
            self.shards.append(vectors_file)
        if not keys:
            self._keys, self._shard, self._row = np.zeros(0, "S1"), np.zeros(0, np.int32), np.zeros(0, np.int32)
            return
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        self._keys, self._shard, self._row = all_keys[order], np.concatenate(shard_ids)[order], np.concatenate(rows)[order]

    def __len__(self) -> int:
        return len(self._keys)

    def locate(self, hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each hash; shard -1 where it is not cached."""
        shard = np.full(len(hashes), -1, np.int32)
        row = np.zeros(len(hashes), np.int32)
        if not len(self._keys) or not hashes:
            return shard, row
        keys = np.array([h.encode() for h in hashes])
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        found = self._keys[pos] == keys
        shard[found], row[found] = self._shard[pos[found]], self._row[pos[found]]
        return shard, row

    def embed(self, backend, hashes: list[str], paths: list[Path], batch_size: int,
              unreadable: dict[str, str] | None = None, num_workers: int = 0) -> int:
        """Embed the images of ``hashes`` that are not cached yet; returns how many were embedded.
        Images are decoded by ``num_workers`` DataLoader processes (0: in this one) and encoded in
        batches of ``batch_size``. With ``unreadable``, an image that does not decode is recorded there
        (path -> reason); without, it is an error. Embeddings computed before a failure are saved (a
        crash or Ctrl-C keeps them; a kill loses at most ``shard_size``)."""
        from torch.utils.data import DataLoader

        cached = self.locate(hashes)[0] >= 0
        todo, seen = [], set()  # positions to embed: not cached, first of their hash
        for i, h in enumerate(hashes):
            if not cached[i] and h not in seen:
                seen.add(h)
                todo.append(i)
        if not todo:
            return 0
        batches = -(-len(todo) // batch_size)
        loader = DataLoader(DecodedImages([paths[i] for i in todo]), batch_size=batch_size,
                            num_workers=min(num_workers, batches), collate_fn=list)
        writer = _ShardWriter(self.folder, self.shard_size)
        bad_hashes: dict[str, str] = {}
        try:
            for batch in loader:
                images, positions = [], []
                for k, image, reason in batch:
                    i = todo[k]
                    if reason is None:
                        images.append(image)
                        positions.append(i)
                    elif unreadable is None:
                        raise MiningError(f"{paths[i]}: {reason}")
                    else:
                        bad_hashes[hashes[i]] = reason
                if images:
                    vectors = np.asarray(backend.encode_images(images), dtype=np.float32)
                    writer.add([hashes[i] for i in positions], vectors)
        finally:
            writer.close()  # the last, partial shard
            if writer.written:
                self._load_index()
        if bad_hashes:  # every path with those bytes is unreadable, not only the one decoded
            unreadable.update({str(p): bad_hashes[h] for h, p in zip(hashes, paths) if h in bad_hashes})
        return writer.written

    def matrix(self, hashes: list[str], path: Path | None = None) -> np.ndarray:
        """Rows of ``hashes``' embeddings (zeros where one is not cached). With ``path``, they are
        written there as ``.npy`` a block at a time and returned memory-mapped, so a corpus-sized
        matrix is paged by the OS instead of held in memory."""
        shard, row = self.locate(hashes)
        shape = (len(hashes), self.dim or 0)
        if path is None:
            return self._gather(shard, row)
        # plain writes, not a writable memmap: its dirty pages would count against this process
        with atomic_writer(path) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
            for start in range(0, len(hashes), GATHER_ROWS):
                fh.write(self._gather(shard[start:start + GATHER_ROWS], row[start:start + GATHER_ROWS]).tobytes())
        return np.load(path, mmap_mode="r")

    def _gather(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        out = np.zeros((len(shard), self.dim or 0), np.float32)
        for s in np.unique(shard[shard >= 0]):
            take = shard == s
            out[take] = np.load(self.shards[s], mmap_mode="r")[row[take]]  # the map closes with the view
        return out


class _ShardWriter:
    """Buffers new embeddings and writes each full shard at once (then the rest, on ``close``)."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.hashes: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        self.hashes.extend(hashes)
        self.vectors.append(vectors)
        self.buffered += len(hashes)
        if self.buffered >= self.shard_size:
            rows = np.concatenate(self.vectors)
            while len(rows) >= self.shard_size:
                self._write(self.hashes[:self.shard_size], rows[:self.shard_size])
                self.hashes, rows = self.hashes[self.shard_size:], rows[self.shard_size:]
            self.vectors, self.buffered = [rows], len(rows)

    def close(self) -> None:
        if self.buffered:
            self._write(self.hashes, np.concatenate(self.vectors))
        self.hashes, self.vectors, self.buffered = [], [], 0

    def _write(self, hashes: list[str], vectors: np.ndarray) -> None:
        import os

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns()}-{os.getpid()}"  # unique across runs that share the cache
        _atomic_save(self.folder / f"{name}.vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))
        _atomic_save(self.folder / f"{name}.hashes.npy", np.array([h.encode() for h in hashes]))
        self.written += len(hashes)


def model_key(spec) -> str:
    """Cache key of a model's weights: its name and ``model_identity`` (the run fingerprints' identity of the
    weights: for a local or built folder, the hashes of its files), so a model rebuilt or retrained in the same
    folder never reads the embeddings of the one before (keyed by name and folder, a rebuilt tiny-clip-base read
    its predecessor's)."""
    from unconfuse.eval.models import model_identity

    identity = json.dumps([model_identity(spec), spec.pretrained], sort_keys=True, default=str)
    return f"{spec.name.replace('/', '_').replace(':', '_')}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def default_workers() -> int:
    import os

    return min(4, os.cpu_count() or 1)


class Encoder:
    """A model loaded once for mining, with its embedding cache."""

    def __init__(self, model: str, batch_size: int = 64, device: str | None = None, num_workers: int | None = None,
                 shard_size: int = SHARD_SIZE):
        from unconfuse.eval.models import load_model

        self.backend, spec = load_model(model, device=device)
        if not hasattr(self.backend, "encode_images"):
            raise MiningError(f"{model}: mining needs an image encoder (open-clip, hf-clip or hf-vision), not {spec.family}")
        self.cache = EmbeddingCache(unconfuse_home() / "embeddings", model_key(spec), shard_size)
        self.batch_size = batch_size
        self.num_workers = default_workers() if num_workers is None else num_workers

    def embed(self, hashes: list[str], paths: list[Path], unreadable: dict[str, str] | None = None) -> int:
        """Cache the embeddings of these images (see ``EmbeddingCache.embed``)."""
        return self.cache.embed(self.backend, hashes, paths, self.batch_size, unreadable, self.num_workers)

    def matrix(self, hashes: list[str], path: Path | None = None) -> np.ndarray:
        return self.cache.matrix(hashes, path)


# -- search ---------------------------------------------------------------------------------------

SEARCHES = ("auto", "numpy", "faiss", "ivf")
IVF_MARGIN = 0.02  # the IVF index compares 8-bit codes: search this much below min_sim, keep by the exact cosine
RECALL_QUERIES = 1000  # rows whose exact neighbours measure an approximate search's recall
PAIR_ROWS = 65536  # candidate pairs whose cosines are computed at a time


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def ivf_lists(n: int, nlist: int = 0) -> int:
    """Inverted lists of the IVF index for n vectors: ``nlist``, or about 2 sqrt(n) when 0 (faiss's
    guide says 4-16 sqrt(n); fewer lists train in a minute on 2 cores and each query probes a larger
    share of them), at most n / 39 (faiss wants 39 training points per list)."""
    return max(1, min(nlist or int(round(2 * np.sqrt(n))), n // 39))


def resolve_search(search: str, n: int, ivf_above: int) -> str:
    """The backend that ``search`` runs for n vectors: ``auto`` is ``ivf`` above ``ivf_above`` vectors
    (an exact search of 1M is ~5e14 flops), otherwise exact faiss, or numpy without faiss."""
    if search not in SEARCHES:
        raise MiningError(f"search: {search!r} is not one of {', '.join(SEARCHES)}")
    faiss = _faiss()
    if search in ("faiss", "ivf") and faiss is None:
        raise MiningError(f"search: {search} asked for but faiss is not installed (pip install faiss-cpu)")
    if search != "auto":
        return search
    if faiss is None:
        return "numpy"
    return "ivf" if n > ivf_above else "faiss"


def candidate_pairs(emb: np.ndarray, min_sim: float, block_size: int = 4096, search: str = "auto",
                    nlist: int = 0, nprobe: int = 8, ivf_above: int = 200_000) -> tuple[np.ndarray, np.ndarray, str]:
    """Index pairs (i < j) with emb[i] . emb[j] >= min_sim, sorted, their cosines, and the backend
    that ran. ``emb`` may be a memory map: it is read a tile of ``block_size`` rows at a time.

    ``numpy`` and ``faiss`` are exact: every tile pair (i-tile <= j-tile) is compared, as a matrix
    product or a faiss range search over the tile. ``ivf`` is approximate: a faiss IVF index with 8-bit
    scalar-quantized vectors (n x d bytes), each row range-searched in its ``nprobe`` nearest lists,
    the candidates kept by their exact cosine, so every pair holds and some may be missed (measure
    with ``sampled_recall``). ``auto``: see ``resolve_search``."""
    backend = resolve_search(search, len(emb), ivf_above)
    if backend == "ivf":
        pairs = _ivf_candidates(emb, min_sim, block_size, ivf_lists(len(emb), nlist), nprobe)
    else:
        pairs = _exact_pairs(emb, min_sim, block_size, _faiss() if backend == "faiss" else None)
    # one cosine for every backend (not each backend's rounding), so the pairs kept do not depend on it
    sims = pair_cosines(emb, pairs)
    pairs, sims = pairs[sims >= min_sim], sims[sims >= min_sim]
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order], sims[order], backend


def _tile(emb: np.ndarray, start: int, size: int) -> np.ndarray:
    return np.ascontiguousarray(emb[start:start + size], dtype=np.float32)


def _exact_pairs(emb: np.ndarray, min_sim: float, block_size: int, faiss) -> np.ndarray:
    n = len(emb)
    pairs = [np.zeros((0, 2), np.int64)]
    for i0 in range(0, n, block_size):
        rows = _tile(emb, i0, block_size)
        for j0 in range(i0, n, block_size):
            cols = rows if j0 == i0 else _tile(emb, j0, block_size)
            if faiss is None:
                tile = rows @ cols.T
                ii, jj = np.nonzero(tile >= min_sim)
            else:
                index = faiss.IndexFlatIP(cols.shape[1])
                index.add(cols)
                # range_search keeps sims > radius; nudge so ">= min_sim" holds as documented
                lims, found, jj = index.range_search(rows, float(np.nextafter(min_sim, -np.inf)))
                ii = np.repeat(np.arange(len(rows)), np.diff(lims).astype(np.int64))
                ii, jj = ii[found >= min_sim], jj[found >= min_sim]
            gi, gj = ii + i0, jj + j0
            keep = gj > gi
            pairs.append(np.stack([gi[keep], gj[keep]], axis=1).astype(np.int64))
    return np.concatenate(pairs)


def _ivf_candidates(emb: np.ndarray, min_sim: float, block_size: int, nlist: int, nprobe: int,
                    seed: int = 0) -> np.ndarray:
    """Pairs (i < j) that faiss IVF-SQ8 finds within IVF_MARGIN of min_sim, searched from both ends."""
    faiss = _faiss()
    n, dim = emb.shape
    if n < 2:
        return np.zeros((0, 2), np.int64)
    # L2 on unit vectors ranks as cosine does (|x - y|^2 = 2 - 2 cos), and k-means cells are L2 cells
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_L2)
    train = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False))
    index.train(np.ascontiguousarray(emb[train], dtype=np.float32))
    for start in range(0, n, GATHER_ROWS):
        index.add(_tile(emb, start, GATHER_ROWS))
    index.nprobe = min(nprobe, nlist)
    radius = 2.0 - 2.0 * (min_sim - IVF_MARGIN)
    keys = [np.zeros(0, np.int64)]
    for start in range(0, n, block_size):
        lims, _, ids = index.range_search(_tile(emb, start, block_size), radius)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        # a pair found from either end counts: searching from both raises recall at no cost
        other = ids != rows
        lo, hi = np.minimum(rows[other], ids[other]), np.maximum(rows[other], ids[other])
        keys.append(np.unique(lo * n + hi))
    keys = np.unique(np.concatenate(keys))
    return np.stack([keys // n, keys % n], axis=1)


def pair_cosines(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """emb[i] . emb[j] for each pair (i, j), in float32, PAIR_ROWS pairs at a time (emb may be a memory map)."""
    out = np.zeros(len(pairs), np.float32)
    for start in range(0, len(pairs), PAIR_ROWS):
        chunk = pairs[start:start + PAIR_ROWS]
        out[start:start + len(chunk)] = np.einsum("ij,ij->i", emb[chunk[:, 0]], emb[chunk[:, 1]])
    return out


def sampled_recall(emb: np.ndarray, pairs: np.ndarray, min_sim: float, queries: int = RECALL_QUERIES,
                   block_size: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Recall of a pair search (``pairs``, i < j) against the exact one, measured on ``queries`` random
    rows: their exact neighbours (cos >= min_sim, the row against all of ``emb``), and the share of
    those pairs that ``pairs`` holds. ``recall`` is None when the sampled rows have no exact pair."""
    n = len(emb)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, queries), replace=False))
    rows = np.ascontiguousarray(emb[sample], dtype=np.float32)
    exact = [np.zeros(0, np.int64)]
    for j0 in range(0, n, block_size):
        qi, jj = np.nonzero(rows @ _tile(emb, j0, block_size).T >= min_sim)
        i, j = sample[qi], jj + j0
        exact.append(np.minimum(i, j)[i != j] * n + np.maximum(i, j)[i != j])
    exact_keys = np.unique(np.concatenate(exact))
    found = np.isin(exact_keys, pairs[:, 0].astype(np.int64) * n + pairs[:, 1])
    return {"recall": float(found.mean()) if len(exact_keys) else None, "queries": int(len(sample)),
            "exact_pairs": int(len(exact_keys)), "found_pairs": int(found.sum())}


def select_pairs(pairs: np.ndarray, sim_a: np.ndarray, sim_b: np.ndarray, max_per_image: int) -> list[int]:
    """Indices of the kept pairs: most confusing first (largest sim_a - sim_b), each image in at
    most ``max_per_image`` kept pairs."""
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -(sim_a - sim_b)))
    used: dict[int, int] = {}
    kept = []
    for k in order:
        i, j = int(pairs[k, 0]), int(pairs[k, 1])
        if used.get(i, 0) < max_per_image and used.get(j, 0) < max_per_image:
            used[i] = used.get(i, 0) + 1
            used[j] = used.get(j, 0) + 1
            kept.append(int(k))
    return kept


# -- leakage ----------------------------------------------------------------------------------------

def exclusions(cfg: MiningConfig, items: list[CorpusItem], hashes: list[str], emb_b: np.ndarray,
               encoder_b: Encoder) -> tuple[np.ndarray, dict[str, Any]]:
    """Mask of corpus images to drop: images of the excluded benchmarks and their near-duplicates."""
    from unconfuse.eval.benchmarks import load_benchmark

    names = cfg.exclude
    if names is None:
        names = ["mediconfusion"] if (unconfuse_home() / "mediconfusion" / "dataset.json").exists() else []
    drop = np.zeros(len(items), dtype=bool)
    report: dict[str, Any] = {"benchmarks": {}, "phash_distance": cfg.dedup_phash_distance, "sim_b": cfg.dedup_sim_b}
    corpus_phash = None
    for name in names:
        bench = load_benchmark(name)
        paths = [bench.resolve_image(ref) for ref in bench.unique_images()]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise MiningError(f"--exclude {name}: {len(missing)} image(s) missing, e.g. {missing[0]}; "
                              "exclusion needs the images (download them first)")
        bench_hashes = [sha256_file(p) for p in paths]
        bench_hash_set = set(bench_hashes)
        exact = np.array([h in bench_hash_set for h in hashes], dtype=bool)
        if corpus_phash is None:
            corpus_phash = phash_rows([item.path for item in items])
        near_phash = min_hamming(corpus_phash, phash_rows(paths)) <= cfg.dedup_phash_distance
        encoder_b.embed(bench_hashes, paths)
        bench_b = encoder_b.matrix(bench_hashes)
        near_b = np.zeros(len(items), dtype=bool)
        for start in range(0, len(items), cfg.block_size):
            near_b[start:start + cfg.block_size] = (emb_b[start:start + cfg.block_size] @ bench_b.T).max(axis=1) >= cfg.dedup_sim_b
        new = exact | near_phash | near_b
        report["benchmarks"][name] = {"images": len(paths), "exact": int(exact.sum()),
                                      "near_duplicate_phash": int((near_phash & ~exact).sum()),
                                      "near_duplicate_encoder_b": int((near_b & ~exact & ~near_phash).sum()),
                                      "excluded": int((new & ~drop).sum())}
        drop |= new
    report["excluded_images"] = int(drop.sum())
    return drop, report


# -- questions ------------------------------------------------------------------------------------

def parse_question(text: str | None) -> dict[str, str] | None:
    """The LLM's JSON reply as pair fields, or None when it is not a valid two-option question
    whose answers differ between the two images."""
    try:
        data = json.loads(text or "")
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    fields = {}
    for key in ("question", "option_a", "option_b"):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            return None
        fields[key] = value.strip()
    answers = [str(data.get(k, "")).strip().upper() for k in ("answer_1", "answer_2")]
    if sorted(answers) != ["A", "B"] or fields["option_a"].lower() == fields["option_b"].lower():
        return None
    fields["answer_1"], fields["answer_2"] = answers
    return fields


def ask_question(cfg: MiningConfig, prompts: dict[str, Any], caption_1: str, caption_2: str) -> str:
    from unconfuse.eval.judge import chat_completion, chat_endpoint

    body = {"model": cfg.llm_model, "temperature": 0.0, "response_format": {"type": "json_object"},
            "messages": [{"role": "system", "content": prompts["system"]},
                         {"role": "user", "content": prompts["template"].format(caption_1=caption_1, caption_2=caption_2)}]}
    return chat_completion(chat_endpoint(cfg.llm_url), body)


# -- the job ----------------------------------------------------------------------------------------

def write_train_val(pairs: list[Pair], out: Path, seed: int, val_folds: int = 10) -> dict[str, int] | None:
    """``train.jsonl`` and ``val.jsonl`` beside ``pairs.jsonl``: a grouped split (about 1/val_folds of
    the pairs to val; pairs that share an image stay on one side), so a recipe can train on the mined
    pairs, select its checkpoint on held-out mined pairs, and test on the benchmark. None when the
    pairs form fewer than two image-sharing components."""
    from unconfuse.eval.benchmarks import Benchmark
    from unconfuse.eval.splits import grouped_folds, image_components

    bench = Benchmark(pairs, out, "mined")
    components = image_components(bench) if pairs else []
    if len(components) < 2:
        return None
    assignment = grouped_folds(bench, min(val_folds, len(components)), seed, components)
    write_jsonl([p for p, a in zip(pairs, assignment) if a != 0], out / "train.jsonl")
    write_jsonl([p for p, a in zip(pairs, assignment) if a == 0], out / "val.jsonl")
    return {"train": sum(a != 0 for a in assignment), "val": sum(a == 0 for a in assignment)}


def mine(cfg: MiningConfig) -> dict[str, Any]:
    """Mine confusing pairs from ``cfg.corpus`` into ``cfg.out`` (pairs.jsonl, its grouped
    train.jsonl/val.jsonl split, mining.json)."""
    start = time.time()
    if cfg.make_questions and not (cfg.llm_url and cfg.llm_model):
        raise MiningError("--make-questions needs --llm-url and --llm-model")
    if cfg.max_pairs_per_image < 1:
        raise MiningError(f"--max-pairs-per-image must be at least 1, got {cfg.max_pairs_per_image}")
    for name, low in (("shard_size", 1), ("ivf_nprobe", 1), ("ivf_nlist", 0), ("num_workers", 0)):
        if (getattr(cfg, name) or 0) < low:
            raise MiningError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(cfg, name)}")
    out = Path(cfg.out)
    items = load_corpus(cfg.corpus)
    if len(items) < 2:
        raise MiningError(f"{cfg.corpus}: {len(items)} image(s); mining needs at least two")
    missing = [str(item.path) for item in items if not item.path.exists()]
    if missing:
        raise MiningError(f"{cfg.corpus}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    from ..world import prepare

    prepare(models=[cfg.encoder_a, cfg.encoder_b], benchmarks=cfg.exclude or [])  # after the corpus checks: builds take minutes
    corpus_images = len(items)
    # unreadable images are skipped and listed, not fatal: a large corpus has a few (special files would block a read)
    unreadable = {str(item.path): "not a regular file" for item in items if not item.path.is_file()}
    items = [item for item in items if str(item.path) not in unreadable]
    hashes = [sha256_file(item.path) for item in items]
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("out", "device", "batch_size", "force", "num_workers", "shard_size")}  # none changes the pairs
    corpus = hashlib.sha256(json.dumps([[h, item.caption] for h, item in zip(hashes, items)]).encode()).hexdigest()[:16]
    # the output folder is owned for the whole mining run: a second writer, or other settings or corpus, are refused
    with owned_folder(out, {"command": "mine", "settings": settings, "corpus": corpus}, force=cfg.force, what="mining"):
        return _mine_into(cfg, out, items, hashes, unreadable, corpus_images, start)


def _mine_into(cfg: MiningConfig, out: Path, items: list, hashes: list[str], unreadable: dict[str, str],
               corpus_images: int, start: float) -> dict[str, Any]:
    # the search matrices: run-local copies of the cached rows in corpus order, memory-mapped
    matrix_a, matrix_b = out / ".search-matrix-a.npy", out / ".search-matrix-b.npy"
    try:
        return _mine_with_matrices(cfg, out, items, hashes, unreadable, corpus_images, start, matrix_a, matrix_b)
    finally:
        matrix_a.unlink(missing_ok=True)
        matrix_b.unlink(missing_ok=True)


def _mine_with_matrices(cfg: MiningConfig, out: Path, items: list, hashes: list[str], unreadable: dict[str, str],
                        corpus_images: int, start: float, matrix_a: Path, matrix_b: Path) -> dict[str, Any]:
    import yaml

    timings = {}
    t = time.time()
    encoder_a = Encoder(cfg.encoder_a, cfg.batch_size, cfg.device, cfg.num_workers, cfg.shard_size)
    encoder_a.embed(hashes, [item.path for item in items], unreadable)
    cache_a = encoder_a.cache
    del encoder_a  # its weights go before encoder B's load
    encoder_b = Encoder(cfg.encoder_b, cfg.batch_size, cfg.device, cfg.num_workers, cfg.shard_size)
    readable = [i for i, item in enumerate(items) if str(item.path) not in unreadable]
    items, hashes = [items[i] for i in readable], [hashes[i] for i in readable]
    encoder_b.embed(hashes, [item.path for item in items], unreadable)
    readable = [i for i, item in enumerate(items) if str(item.path) not in unreadable]  # encoder B decodes once more
    items, hashes = [items[i] for i in readable], [hashes[i] for i in readable]
    if len(items) < 2:
        raise MiningError(f"{cfg.corpus}: {len(items)} readable image(s) of {corpus_images}; mining needs at least two "
                          f"(unreadable: {', '.join(sorted(unreadable)[:3])}{' ...' if len(unreadable) > 3 else ''})")
    emb_b = encoder_b.matrix(hashes, matrix_b)
    timings["embed_s"] = time.time() - t
    t = time.time()
    dropped, leakage = exclusions(cfg, items, hashes, emb_b, encoder_b)
    # one image per content hash: byte-identical corpus copies would pair with themselves
    first_of_hash: dict[str, int] = {}
    duplicate = np.zeros(len(items), dtype=bool)
    for i, h in enumerate(hashes):
        if h in first_of_hash:
            duplicate[i] = True
        else:
            first_of_hash[h] = i
    keep_idx = np.nonzero(~dropped & ~duplicate)[0]
    emb_a = cache_a.matrix([hashes[i] for i in keep_idx], matrix_a)
    timings["exclude_s"] = time.time() - t
    t = time.time()
    local, sim_a, backend = candidate_pairs(emb_a, cfg.min_sim_a, cfg.block_size, cfg.search, cfg.ivf_nlist,
                                            cfg.ivf_nprobe, cfg.ivf_above)
    cand = keep_idx[local] if len(local) else np.zeros((0, 2), np.int64)
    sim_b = pair_cosines(emb_b, cand)
    rule = sim_b <= cfg.max_sim_b
    same_caption = np.array([items[i].caption == items[j].caption for i, j in cand], dtype=bool)
    usable = np.nonzero(rule & ~same_caption)[0]
    kept = [int(usable[k]) for k in select_pairs(cand[usable], sim_a[usable], sim_b[usable], cfg.max_pairs_per_image)]
    timings["search_s"] = time.time() - t
    approximate = None
    if backend == "ivf":
        t = time.time()
        nlist = ivf_lists(len(emb_a), cfg.ivf_nlist)
        approximate = {"index": "faiss IVF, 8-bit scalar quantizer", "nlist": nlist, "nprobe": min(cfg.ivf_nprobe, nlist),
                       **sampled_recall(emb_a, local, cfg.min_sim_a, RECALL_QUERIES, cfg.block_size, cfg.seed)}
        timings["recall_s"] = time.time() - t
        recall = "n/a (no exact pair among them)" if approximate["recall"] is None else f"{approximate['recall']:.4f}"
        print(f"approximate search (faiss IVF{approximate['nlist']},SQ8, nprobe {approximate['nprobe']}): recall {recall} "
              f"of the exact pairs of {approximate['queries']} random images ({approximate['found_pairs']} of "
              f"{approximate['exact_pairs']} found)")

    rng = np.random.default_rng(cfg.seed)
    prompts = yaml.safe_load(QUESTION_PROMPTS.read_text()) if cfg.make_questions else None
    pairs: list[Pair] = []
    questions = {"asked": 0, "dropped": 0}
    for n, k in enumerate(kept):
        i, j = int(cand[k, 0]), int(cand[k, 1])
        a, b = items[i], items[j]
        record: dict[str, Any] = dict(question=CAPTION_QUESTION, option_a=a.caption, option_b=b.caption,
                                      answer_1="A", answer_2="B")
        if rng.random() < 0.5:  # no letter prior: swap option order for half of the pairs
            record.update(option_a=b.caption, option_b=a.caption, answer_1="B", answer_2="A")
        source = f"mined:{Path(cfg.corpus).name}"
        if prompts is not None:
            questions["asked"] += 1
            fields = parse_question(ask_question(cfg, prompts, a.caption, b.caption))
            if fields is None:
                questions["dropped"] += 1
                continue
            record.update(fields)
            source += f":{prompts['version']}"
        pairs.append(Pair(id=f"mined-{n:06d}", image_1=str(a.path.resolve()), image_2=str(b.path.resolve()),
                          categories_1=a.categories, categories_2=b.categories, caption_1=a.caption,
                          caption_2=b.caption, source=source,
                          sims={"a": round(float(sim_a[k]), 6), "b": round(float(sim_b[k]), 6)}, **record))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(pairs, out / "pairs.jsonl")
    split = write_train_val(pairs, out, cfg.seed)
    report = {"config": asdict(cfg), "train_val": split, "corpus_images": corpus_images, "unreadable_images": len(unreadable),
              "unreadable": [{"image": path, "reason": reason} for path, reason in sorted(unreadable.items())],
              "duplicate_images": int(duplicate.sum()),
              "leakage": leakage, "searched_images": int(len(keep_idx)), "search_backend": backend, "approximate": approximate,
              "candidates_sim_a": int(len(cand)), "candidates_rule": int(rule.sum()),
              "dropped_same_caption": int((rule & same_caption).sum()),
              "dropped_max_pairs_per_image": int(len(usable) - len(kept)), "questions": questions if prompts else None,
              "pairs": len(pairs), "timings": timings, "wall_time_s": time.time() - start}
    atomic_write_json(out / "mining.json", report)
    return report
