"""Adapter checkpoints: `adapter.safetensors` plus `adapter_config.json`, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file

from mmalign.adapters.base import Adapter
from mmalign.adapters.registry import build_adapter

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, broken or made for other models."""


def mmalign_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmalign")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str:
    """Return the checkout's commit hash, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def save_checkpoint(
    adapter: Adapter, directory: Path, metadata: dict[str, Any], write_extra: Callable[[Path], None] | None = None
) -> Path:
    """Write an adapter checkpoint atomically: a temp directory is renamed into place.

    Args:
        adapter: The adapter to save.
        directory: Target directory (replaced if it exists).
        metadata: Provenance stored in `adapter_config.json` next to the adapter's shape:
            vision encoder, LM, prompt, training step, dataset fingerprint.
        write_extra: Called with the staging directory to add files (training state)
            before the directory is renamed into place.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "adapter": adapter.shape_config(),
        **metadata,
        "mmalign_version": mmalign_version(),
        "git_commit": git_commit(),
    }
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        tensors = {name: tensor.detach().contiguous() for name, tensor in adapter.state_dict().items()}
        save_file(tensors, staging / WEIGHTS_NAME)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        if write_extra is not None:
            write_extra(staging)
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_checkpoint(directory: Path, expect_vision: dict[str, Any] | None = None, expect_lm: dict[str, Any] | None = None) -> tuple[Adapter, dict[str, Any]]:
    """Load an adapter checkpoint (safetensors only; nothing is unpickled).

    Args:
        directory: The checkpoint directory.
        expect_vision: `{"encoder_id", "d_model"}` of the vision encoder in use, checked when given.
        expect_lm: `{"lm_id", "d_model"}` of the LM in use, checked when given.

    Raises:
        CheckpointError: when files are missing or unreadable, or the checkpoint was made
            for another vision encoder or LM (naming both).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {path.name}; is this an adapter checkpoint directory?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        shape = config["adapter"]
        adapter = build_adapter(shape)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {directory} has an invalid {CONFIG_NAME}: {error!r}") from None

    if expect_vision is not None:
        saved = config.get("vision_encoder", {})
        if saved.get("encoder_id") != expect_vision["encoder_id"] or shape["d_vision"] != expect_vision["d_model"]:
            raise CheckpointError(
                f"checkpoint {directory} was trained for vision encoder {saved.get('encoder_id')!r} "
                f"(d={shape['d_vision']}), but the run uses {expect_vision['encoder_id']!r} (d={expect_vision['d_model']})"
            )
    if expect_lm is not None:
        saved_lm = config.get("lm", {})
        if saved_lm.get("lm_id") != expect_lm["lm_id"] or shape["d_lm"] != expect_lm["d_model"]:
            raise CheckpointError(
                f"checkpoint {directory} was trained for LM {saved_lm.get('lm_id')!r} (d={shape['d_lm']}), "
                f"but the run uses {expect_lm['lm_id']!r} (d={expect_lm['d_model']})"
            )

    try:
        adapter.load_state_dict(load_file(weights_path))
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"checkpoint {directory} has unreadable or mismatched weights: {error}") from None
    return adapter, config
