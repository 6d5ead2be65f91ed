"""``unconfuse data download``: MediConfusion's questions from its repository, its images from
PMC's Cloud Service.

The reference downloader fetched PMC's legacy FTP ``oa_package`` tarballs, which PMC retired in
2026. Articles now live in the public S3 bucket ``pmc-oa-opendata``, one folder per article
version holding each file individually (``PMC<id>.<version>/<file name>``). For each image we list
the article's versions (ListObjectsV2 with prefix ``PMC<id>.``), fetch the figure from the newest
version that has it, and verify size, MD5 (the ETag, when it is a plain MD5) and that it decodes.
Downloads are parallel, retried with backoff, written atomically and resumable: a rerun fetches
nothing already present and verified (``manifest.json`` holds each image's sha256).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from .http import RETRY_STATUS, http_session
from .io import atomic_write_bytes, atomic_write_json, sha256_file

DEFAULT_QUESTIONS_URL = "https://raw.githubusercontent.com/MShahabSepehri/MediConfusion/main/data/dataset.json"
DEFAULT_IMAGE_DICT_URL = "https://raw.githubusercontent.com/MShahabSepehri/MediConfusion/main/data/image_dict.json"
DEFAULT_PMC_BASE = "https://pmc-oa-opendata.s3.amazonaws.com"
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class DownloadError(RuntimeError):
    pass


@dataclass
class DownloadConfig:
    """Settings of ``unconfuse data download``; the command line's options are made from these fields."""

    out: Path = field(metadata={"help": "folder for dataset.json, image_dict.json, images/ and manifest.json; "
                                        "rerun to resume"})
    questions_url: str = field(default=DEFAULT_QUESTIONS_URL, metadata={"help": "MediConfusion's dataset.json"})
    image_dict_url: str = field(default=DEFAULT_IMAGE_DICT_URL, metadata={
        "help": "MediConfusion's image_dict.json (where each image comes from)"})
    pmc_base: str = field(default=DEFAULT_PMC_BASE, metadata={"help": "bucket URL (mirrors, tests)"})
    roco: Path | None = field(default=None, metadata={
        "help": "a local ROCO dataset folder to take images from instead of PMC"})
    jobs: int = field(default=8, metadata={"help": "parallel downloads"})
    retries: int = field(default=4, metadata={"help": "retries per request on 5xx, 429 and broken connections"})
    backoff: float = field(default=0.5, metadata={"help": "seconds of the exponential backoff between retries"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per request"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr; --quiet turns them off"})


@dataclass
class Failure:
    local: str
    url: str
    reason: str

    def __str__(self) -> str:
        return f"{self.local}.jpg <- {self.url}: {self.reason}"


class Fetcher:
    """HTTP GET through ``http_session``: retries with exponential backoff on 5xx/429, broken
    connections and timeouts."""

    def __init__(self, retries: int, backoff: float, timeout: float, pool_maxsize: int = 10):
        self.session = http_session(retries, backoff, pool_maxsize=pool_maxsize)
        self.retries, self.backoff, self.timeout = retries, backoff, timeout

    def get(self, url: str, verify: Callable[[bytes], None] | None = None) -> bytes:
        """The body of ``url``. A body broken mid-transfer, or one that ``verify`` rejects (size, MD5), is fetched
        again (the session's retries cover only what fails before the body), up to ``retries`` more times."""
        import time

        import requests

        attempts = f"after {self.retries + 1} attempts"
        for attempt in range(self.retries + 1):
            try:
                reply = self.session.get(url, timeout=self.timeout)
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
                broken = DownloadError(f"{type(exc).__name__}: {exc}")  # cut mid-body
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError) as exc:
                raise DownloadError(f"{type(exc).__name__}: {exc} {attempts}") from exc
            else:
                if reply.status_code in RETRY_STATUS:
                    raise DownloadError(f"HTTP {reply.status_code} {attempts}")
                if reply.status_code != 200:
                    raise DownloadError(f"HTTP {reply.status_code}")
                try:
                    if verify is not None:
                        verify(reply.content)
                    return reply.content
                except DownloadError as exc:
                    broken = exc
            if attempt < self.retries and self.backoff:
                time.sleep(min(120.0, self.backoff * 2 ** attempt))
        raise DownloadError(f"{broken} {attempts}")


def pmc_id(dlink: str) -> str:
    match = re.search(r"PMC\d+", dlink)
    if not match:
        raise DownloadError(f"no PMC id in {dlink!r}")
    return match.group(0)


def list_versions(fetcher: Fetcher, base: str, pmcid: str) -> dict[int, dict[str, dict[str, Any]]]:
    """{version: {file name: {size, etag}}} for one article (follows ListObjectsV2 pagination)."""
    versions: dict[int, dict[str, dict[str, Any]]] = {}
    token = None
    while True:
        url = f"{base.rstrip('/')}/?list-type=2&prefix={quote(pmcid + '.')}"
        if token:
            url += f"&continuation-token={quote(token)}"
        root = ET.fromstring(fetcher.get(url))
        for item in root.iter(f"{S3_NS}Contents"):
            key = item.findtext(f"{S3_NS}Key") or ""
            match = re.match(rf"^{pmcid}\.(\d+)/(.+)$", key)
            if match:
                versions.setdefault(int(match.group(1)), {})[match.group(2)] = {
                    "size": int(item.findtext(f"{S3_NS}Size") or -1),
                    "etag": (item.findtext(f"{S3_NS}ETag") or "").strip('"'),
                }
        if (root.findtext(f"{S3_NS}IsTruncated") or "false").lower() != "true":
            return versions
        token = root.findtext(f"{S3_NS}NextContinuationToken")


def verify_image_bytes(data: bytes, size: int | None = None, etag: str | None = None) -> None:
    """Size from the listing, MD5 against a plain-MD5 ETag, and that the bytes decode as an image."""
    from PIL import Image

    if size is not None and size >= 0 and len(data) != size:
        raise DownloadError(f"size {len(data)} != listed {size}")
    if etag and re.fullmatch(r"[0-9a-f]{32}", etag) and hashlib.md5(data).hexdigest() != etag:
        raise DownloadError("MD5 does not match the ETag")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:
        raise DownloadError(f"not a decodable image ({exc})") from exc


def source_url(cfg: DownloadConfig, roco_path: str, info: dict[str, Any], listings: dict[str, Any]) -> str:
    """Where an image was (or would have been) fetched from, for the failure report."""
    if cfg.roco is not None:
        return str(cfg.roco / roco_path)
    try:
        pmcid = pmc_id(info["dlink"])
    except DownloadError:
        return str(info.get("dlink"))
    base = cfg.pmc_base.rstrip("/")
    having = sorted((v for v, files in listings.get(pmcid, {}).items() if info["file_name"] in files), reverse=True)
    if having:
        return f"{base}/{pmcid}.{having[0]}/{quote(info['file_name'])}"
    return f"{base}/?list-type=2&prefix={quote(pmcid + '.')}"


def download(cfg: DownloadConfig) -> list[Failure]:
    """Download (or resume) MediConfusion into ``cfg.out``; returns the images that failed."""
    from tqdm import tqdm

    out = Path(cfg.out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    fetcher = Fetcher(cfg.retries, cfg.backoff, cfg.timeout, pool_maxsize=max(10, cfg.jobs))
    for url, name in ((cfg.questions_url, "dataset.json"), (cfg.image_dict_url, "image_dict.json")):
        if not (out / name).exists():
            try:
                data = fetcher.get(url)
            except DownloadError as exc:
                raise DownloadError(f"{url}: {exc}") from exc
            json.loads(data)  # refuse to save something that is not JSON
            atomic_write_bytes(out / name, data)
    image_dict = json.loads((out / "image_dict.json").read_text())
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    lock = threading.Lock()
    listings: dict[str, Any] = {}
    listing_locks: dict[str, threading.Lock] = {}

    def verified(local: str) -> bool:
        entry = manifest.get(local)
        path = images_dir / f"{local}.jpg"
        return bool(entry) and path.exists() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]

    def listing(pmcid: str):
        with lock:
            article_lock = listing_locks.setdefault(pmcid, threading.Lock())
        with article_lock:  # one listing per article, even when several of its figures run at once
            if pmcid not in listings:
                listings[pmcid] = list_versions(fetcher, cfg.pmc_base, pmcid)
            return listings[pmcid]

    def fetch_one(roco_path: str, info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        local = str(info["local"])
        if cfg.roco is not None:
            candidates = [cfg.roco / roco_path, cfg.roco / "data" / roco_path]
            source = next((c for c in candidates if c.exists()), None)
            if source is None:
                raise DownloadError(f"not in the ROCO folder (looked for {candidates[0]})")
            data = source.read_bytes()
            verify_image_bytes(data)
            url = source.resolve().as_uri()
        else:
            pmcid = pmc_id(info["dlink"])
            versions = listing(pmcid)
            having = sorted((v for v, files in versions.items() if info["file_name"] in files), reverse=True)
            if not having:
                raise DownloadError(f"{info['file_name']} is in no version of {pmcid} in the bucket")
            meta = versions[having[0]][info["file_name"]]
            url = f"{cfg.pmc_base.rstrip('/')}/{pmcid}.{having[0]}/{quote(info['file_name'])}"
            data = fetcher.get(url, verify=lambda body: verify_image_bytes(body, meta["size"], meta["etag"]))
        atomic_write_bytes(images_dir / f"{local}.jpg", data)
        return local, {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "url": url, "roco": roco_path}

    todo = [(k, v) for k, v in image_dict.items() if not verified(str(v["local"]))]
    failures: list[Failure] = []
    done_since_save = 0
    bar = tqdm(total=len(todo), unit="img", desc="MediConfusion images", disable=not cfg.progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
            futures = {pool.submit(fetch_one, k, v): (k, v) for k, v in todo}
            for future in as_completed(futures):
                roco_path, info = futures[future]
                try:
                    local, entry = future.result()
                    with lock:
                        manifest[local] = entry
                        done_since_save += 1
                        if done_since_save >= 20:
                            atomic_write_json(manifest_path, manifest)
                            done_since_save = 0
                except Exception as exc:  # every failure is reported at the end; the rest continue
                    failures.append(Failure(str(info["local"]), source_url(cfg, roco_path, info, listings), str(exc)))
                bar.update(1)
    finally:
        bar.close()
        atomic_write_json(manifest_path, dict(sorted(manifest.items())))
    return sorted(failures, key=lambda f: f.local)

