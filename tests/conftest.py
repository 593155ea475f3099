"""Shared fixtures: the bundled models load once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _mmalign_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Reuse a cache the developer or CI already has; otherwise models convert once per session.
    if "MMALIGN_CACHE_DIR" not in os.environ:
        os.environ["MMALIGN_CACHE_DIR"] = str(Path.home() / ".cache" / "mmalign")


@pytest.fixture(scope="session")
def smollm2():
    from mmalign.lm import load_lm

    return load_lm("bundled:smollm2-135m")


@pytest.fixture(scope="session")
def dinov2():
    from mmalign.vision import load_vision_encoder

    return load_vision_encoder("bundled:dinov2-small", image_size=112)
