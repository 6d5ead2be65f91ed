"""Shared fixtures: offline environment, one cache of tiny models per session, real benchmark text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU-only machines: DeepSpeed's own fallback, without its warning

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDICONFUSION = REPO.parent / "shared" / "mediconfusion"


@pytest.fixture(scope="session", autouse=True)
def unconfuse_home(tmp_path_factory) -> Path:
    """UNCONFUSE_HOME for the whole session: tiny models are built once and reused."""
    home = Path(os.environ.get("UNCONFUSE_TEST_HOME") or tmp_path_factory.mktemp("unconfuse_home"))
    os.environ["UNCONFUSE_HOME"] = str(home)
    return home


TINY_PRESETS = ("tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-gemma3", "tiny-llava-next", "tiny-llava-med", "tiny-clip", "tiny-hf-clip", "tiny-dinov2",
                "tiny-biomedclip", "tiny-pmc-clip", "tiny-siglip")


@pytest.fixture(scope="session", autouse=True)
def tiny_models(unconfuse_home) -> None:
    """The random tiny presets, built once (~5 s): tests load them directly, as users load presets."""
    from unconfuse.eval.world import prepare

    prepare(models=TINY_PRESETS)


@pytest.fixture(scope="session")
def world_of(tmp_path_factory):
    """``world_of(pairs)``: a small embedded world of that many pairs (32-px images), built once per session and
    shared: tests read it and write their runs elsewhere."""
    from unconfuse.eval.world import WorldConfig, synthesize

    built = {}

    def build(pairs: int):
        if pairs not in built:
            built[pairs] = synthesize(WorldConfig(pairs=pairs, bases_per_source=8, corpus_size=10, image_size=32),
                                      tmp_path_factory.mktemp(f"world{pairs}") / "world")
        return built[pairs]

    return build


@pytest.fixture(scope="session")
def world(world_of):
    """The 30-pair world most tests train and score on."""
    return world_of(30)


@pytest.fixture(scope="session")
def sample_bench(tmp_path_factory) -> Path:
    from unconfuse.eval.world.sample import write_sample_benchmark

    return write_sample_benchmark(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def mediconfusion_dir() -> Path:
    if not (SHARED_MEDICONFUSION / "dataset.json").exists():
        pytest.skip("../shared/mediconfusion is not here")
    return SHARED_MEDICONFUSION
