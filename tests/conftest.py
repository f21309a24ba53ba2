"""Shared fixtures: offline, single-threaded, tiny models built once per session."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; bench/gpu_check.sh runs them)")


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_cache):
    """``tiny_model(family) -> Path`` of a tiny checkpoint, built once per session."""
    from llmc.testing.tiny_models import ensure_tiny_model

    def get(family: str, seed: int = 0) -> Path:
        return ensure_tiny_model(family, tiny_cache, seed=seed)

    return get


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> Path:
    """A small custom_mm calibration set (mme_synth calib split)."""
    from llmc.data.mme_synth import generate

    return generate(tmp_path_factory.mktemp("calib") / "mme_calib", "calib", n_images=6, seed=0)


@pytest.fixture
def restore_logging():
    """Put loguru back to one INFO sink on stderr after a test that ran a CLI job (it adds its own sinks)."""
    yield
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO")
