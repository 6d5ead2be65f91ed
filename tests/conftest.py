"""Shared fixtures: offline environment, one cache of tiny models per session, real benchmark text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDICONFUSION = REPO.parent / "shared" / "mediconfusion"


@pytest.fixture(scope="session", autouse=True)
def unconfuse_home(tmp_path_factory) -> Path:
    """UNCONFUSE_HOME for the whole session: tiny models are built once and reused."""
    home = Path(os.environ.get("UNCONFUSE_TEST_HOME") or tmp_path_factory.mktemp("unconfuse_home"))
    os.environ["UNCONFUSE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def sample_bench(tmp_path_factory) -> Path:
    from unconfuse.eval.sample import write_sample_benchmark

    return write_sample_benchmark(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def mediconfusion_dir() -> Path:
    if not (SHARED_MEDICONFUSION / "dataset.json").exists():
        pytest.skip("../shared/mediconfusion is not here")
    return SHARED_MEDICONFUSION
