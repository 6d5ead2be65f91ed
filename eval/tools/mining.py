"""``unconfuse mine``: confusing pairs from an image-caption corpus, by MediConfusion's own rule.

MediConfusion's pairs are images that a CLIP-style encoder finds nearly identical (BiomedCLIP
cosine >= 0.9) while a vision-only self-supervised model sees them as different (DINOv2 cosine
0.33-0.74). Mining applies that rule to a corpus:

1. embed every corpus image with encoder A (the kind of model being fixed) and encoder B (vision
   only); embeddings are cached per model and image content hash, so reruns and larger corpora
   only embed new images;
2. drop every image of the excluded benchmarks and its near-duplicates (same bytes, perceptual
   hash within a distance, or encoder-B cosine above a threshold), counted in ``mining.json``;
3. search all pairs with cos(A) >= min_sim_a in blocks (never an N x N matrix; faiss range search
   when installed), keep those with cos(B) <= max_sim_b and different captions;
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

from unconfuse.eval.io import atomic_write_json, owned_folder, sha256_file
from unconfuse.eval.home import unconfuse_home
from unconfuse.eval.pairs import Pair, write_jsonl

CAPTION_QUESTION = "Which caption describes this image?"
QUESTION_PROMPTS = Path(__file__).resolve().parents[1] / "prompts" / "make-questions-v1.yaml"


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
    search: Literal["auto", "faiss", "numpy"] = field(default="auto", metadata={
        "help": "pair search: auto (faiss when installed), faiss or numpy"})
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

class EmbeddingCache:
    """Unit-norm image embeddings of one model, by image content hash, in ``.npz`` chunks under
    ``root/<model key>/`` (one chunk per call that embedded something new; written atomically)."""

    def __init__(self, root: Path, model_key: str):
        self.folder = root / model_key
        self.vectors: dict[str, np.ndarray] = {}
        for chunk in sorted(self.folder.glob("chunk-*.npz")):
            with np.load(chunk) as data:
                self.vectors.update(zip(data["hashes"].tolist(), data["vectors"]))

    def embed(self, adapter, hashes: list[str], paths: list[Path], batch_size: int,
              unreadable: dict[str, str] | None = None) -> np.ndarray:
        """Rows of ``hashes``' embeddings. With ``unreadable``, an image that does not decode is recorded
        there (path -> reason) and its row is zeros; without, it is an error. Embeddings computed before
        any failure are saved (a crash or Ctrl-C does not lose them)."""
        from unconfuse.eval.images import UnreadableImage, decode_image

        todo = [i for i, h in enumerate(hashes) if h not in self.vectors]
        new_hashes, new_vectors = [], []
        try:
            for start in range(0, len(todo), batch_size):
                batch, images = [], []
                for i in todo[start:start + batch_size]:
                    try:
                        images.append(decode_image(paths[i]))
                        batch.append(i)
                    except UnreadableImage as exc:
                        if unreadable is None:
                            raise MiningError(f"{paths[i]}: {exc}") from None
                        unreadable[str(paths[i])] = str(exc)
                if not batch:
                    continue
                vectors = adapter.encode_images(images).numpy().astype(np.float32)
                for i, vector in zip(batch, vectors):
                    if hashes[i] not in self.vectors:
                        self.vectors[hashes[i]] = vector
                        new_hashes.append(hashes[i])
                        new_vectors.append(vector)
        finally:
            if new_hashes:
                self._save_chunk(new_hashes, new_vectors)
        if not self.vectors:
            return np.zeros((len(hashes), 0), np.float32)
        blank = np.zeros_like(next(iter(self.vectors.values())))
        return np.stack([self.vectors.get(h, blank) for h in hashes]) if hashes else np.zeros((0, 0), np.float32)

    def _save_chunk(self, hashes: list[str], vectors: list[np.ndarray]) -> None:
        import os
        import tempfile

        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, hashes=np.array(hashes), vectors=np.stack(vectors))
        os.replace(tmp, self.folder / f"chunk-{time.time_ns()}.npz")


def model_key(adapter, spec) -> str:
    """Cache key of a model's weights: its name plus the folder or hub id it was loaded from."""
    source = getattr(getattr(adapter, "model", None), "name_or_path", None) or spec.model_id or spec.name
    digest = hashlib.sha256(f"{spec.name}|{source}|{spec.pretrained}|{spec.revision}".encode()).hexdigest()[:12]
    return f"{spec.name.replace('/', '_').replace(':', '_')}-{digest}"


class Encoder:
    """A model loaded once for mining, with its embedding cache."""

    def __init__(self, model: str, batch_size: int = 64, device: str | None = None):
        from unconfuse.eval.models import load_model

        self.adapter, spec = load_model(model, device=device)
        if not hasattr(self.adapter, "encode_images"):
            raise MiningError(f"{model}: mining needs an image encoder (open-clip, hf-clip or hf-vision), not {spec.family}")
        self.cache = EmbeddingCache(unconfuse_home() / "embeddings", model_key(self.adapter, spec))
        self.batch_size = batch_size

    def embed(self, hashes: list[str], paths: list[Path], unreadable: dict[str, str] | None = None) -> np.ndarray:
        return self.cache.embed(self.adapter, hashes, paths, self.batch_size, unreadable)


# -- search ---------------------------------------------------------------------------------------

def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def candidate_pairs(emb_a: np.ndarray, min_sim: float, block_size: int = 4096, search: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """All index pairs (i < j) with emb_a[i] . emb_a[j] >= min_sim, and their similarities.
    Tiles of block_size x block_size only; with faiss, a range search per block of queries."""
    n = len(emb_a)
    faiss = _faiss() if search in ("auto", "faiss") else None
    if search == "faiss" and faiss is None:
        raise MiningError("search: faiss asked for but not installed (pip install faiss-cpu)")
    emb_a = np.ascontiguousarray(emb_a, dtype=np.float32)
    pairs, sims = [], []
    if faiss is not None:
        index = faiss.IndexFlatIP(emb_a.shape[1])
        index.add(emb_a)
        for start in range(0, n, block_size):
            # range_search keeps sims > radius; nudge so ">= min_sim" holds as documented
            lims, dist, ids = index.range_search(emb_a[start:start + block_size], float(np.nextafter(min_sim, -np.inf)))
            rows = np.repeat(np.arange(start, min(start + block_size, n)), np.diff(lims).astype(np.int64))
            keep = (ids > rows) & (dist >= min_sim)
            pairs.append(np.stack([rows[keep], ids[keep]], axis=1))
            sims.append(dist[keep])
        backend = "faiss"
    else:
        for i0 in range(0, n, block_size):
            rows = emb_a[i0:i0 + block_size]
            for j0 in range(i0, n, block_size):
                tile = rows @ emb_a[j0:j0 + block_size].T
                ii, jj = np.nonzero(tile >= min_sim)
                gi, gj = ii + i0, jj + j0
                keep = gj > gi
                pairs.append(np.stack([gi[keep], gj[keep]], axis=1))
                sims.append(tile[ii[keep], jj[keep]])
        backend = "numpy"
    if not pairs:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), backend
    pairs_arr, sims_arr = np.concatenate(pairs).astype(np.int64), np.concatenate(sims).astype(np.float32)
    order = np.lexsort((pairs_arr[:, 1], pairs_arr[:, 0]))
    return pairs_arr[order], sims_arr[order], backend


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

def _phash(path: Path):
    import imagehash

    from unconfuse.eval.images import load_image

    return imagehash.phash(load_image(path))


def _phash_bytes(paths: list[Path]) -> np.ndarray:
    """64-bit perceptual hashes (imagehash.phash) as rows of 8 bytes."""
    return np.stack([np.packbits(_phash(p).hash.flatten()) for p in paths]) if paths else np.zeros((0, 8), np.uint8)


def min_hamming(a: np.ndarray, b: np.ndarray, block: int = 4096) -> np.ndarray:
    """For each row of ``a`` (packed 64-bit hashes), the smallest Hamming distance to a row of ``b``."""
    out = np.empty(len(a), dtype=np.int64)
    for start in range(0, len(a), block):
        xor = np.bitwise_xor(a[start:start + block, None, :], b[None, :, :])
        out[start:start + block] = np.bitwise_count(xor).sum(axis=-1, dtype=np.int64).min(axis=1)
    return out


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
            corpus_phash = _phash_bytes([item.path for item in items])
        near_phash = min_hamming(corpus_phash, _phash_bytes(paths)) <= cfg.dedup_phash_distance
        bench_b = encoder_b.embed(bench_hashes, paths)
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
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "batch_size", "force")}
    corpus = hashlib.sha256(json.dumps([[h, item.caption] for h, item in zip(hashes, items)]).encode()).hexdigest()[:16]
    # the output folder is owned for the whole mining run: a second writer, or other settings or corpus, are refused
    with owned_folder(out, {"command": "mine", "settings": settings, "corpus": corpus}, force=cfg.force, what="mining"):
        return _mine_into(cfg, out, items, hashes, unreadable, corpus_images, start)


def _mine_into(cfg: MiningConfig, out: Path, items: list, hashes: list[str], unreadable: dict[str, str],
               corpus_images: int, start: float) -> dict[str, Any]:
    import yaml

    timings = {}
    t = time.time()
    emb_a = Encoder(cfg.encoder_a, cfg.batch_size, cfg.device).embed(hashes, [item.path for item in items], unreadable)
    encoder_b = Encoder(cfg.encoder_b, cfg.batch_size, cfg.device)
    readable = [i for i, item in enumerate(items) if str(item.path) not in unreadable]
    items, hashes, emb_a = [items[i] for i in readable], [hashes[i] for i in readable], emb_a[readable]
    emb_b = encoder_b.embed(hashes, [item.path for item in items], unreadable)
    readable = [i for i, item in enumerate(items) if str(item.path) not in unreadable]  # encoder B decodes once more
    items, hashes, emb_a, emb_b = [items[i] for i in readable], [hashes[i] for i in readable], emb_a[readable], emb_b[readable]
    if len(items) < 2:
        raise MiningError(f"{cfg.corpus}: {len(items)} readable image(s) of {corpus_images}; mining needs at least two "
                          f"(unreadable: {', '.join(sorted(unreadable)[:3])}{' ...' if len(unreadable) > 3 else ''})")
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
    timings["exclude_s"] = time.time() - t
    t = time.time()
    local, _, backend = candidate_pairs(emb_a[keep_idx], cfg.min_sim_a, cfg.block_size, cfg.search)
    cand = keep_idx[local] if len(local) else np.zeros((0, 2), np.int64)
    # both similarities recomputed one way, so the result does not depend on the search backend's rounding
    sim_a = np.einsum("ij,ij->i", emb_a[cand[:, 0]], emb_a[cand[:, 1]]) if len(cand) else np.zeros(0, np.float32)
    cand, sim_a = cand[sim_a >= cfg.min_sim_a], sim_a[sim_a >= cfg.min_sim_a]
    sim_b = np.einsum("ij,ij->i", emb_b[cand[:, 0]], emb_b[cand[:, 1]]) if len(cand) else np.zeros(0, np.float32)
    rule = sim_b <= cfg.max_sim_b
    same_caption = np.array([items[i].caption == items[j].caption for i, j in cand], dtype=bool)
    usable = np.nonzero(rule & ~same_caption)[0]
    kept = [int(usable[k]) for k in select_pairs(cand[usable], sim_a[usable], sim_b[usable], cfg.max_pairs_per_image)]
    timings["search_s"] = time.time() - t

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
              "leakage": leakage, "searched_images": int(len(keep_idx)), "search_backend": backend,
              "candidates_sim_a": int(len(cand)), "candidates_rule": int(rule.sum()),
              "dropped_same_caption": int((rule & same_caption).sum()),
              "dropped_max_pairs_per_image": int(len(usable) - len(kept)), "questions": questions if prompts else None,
              "pairs": len(pairs), "timings": timings, "wall_time_s": time.time() - start}
    atomic_write_json(out / "mining.json", report)
    return report
