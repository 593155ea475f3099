"""Batch evaluation of many checkpoints into one results store, resumable and fault-tolerant.

Frozen models, probes and the vision feature cache load once. Each (checkpoint, metric
set) pair becomes one parquet part under `results/parts/`, written atomically; a rerun
skips parts that exist. A broken or mismatched checkpoint becomes an error row and the
others continue. `results.parquet` is the concatenation of the parts.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmalign.adapters.checkpoint import CheckpointError, load_checkpoint, mmalign_version
from mmalign.evaluate import RESULT_COLUMNS, Evaluator
from mmalign.io import stable_hash, write_atomic, write_parquet_atomic

logger = logging.getLogger("mmalign.evaluate")


def expand_checkpoints(paths: list[str], pattern: str | None) -> list[Path]:
    """Return checkpoint directories from explicit paths and a glob, sorted by training step.

    Raises:
        ValueError: when nothing is given or the glob matches no directory.
    """
    found = [Path(p) for p in paths]
    if pattern:
        matched = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
        if not matched:
            raise ValueError(f"--glob {pattern!r} matched no checkpoint directory; check the pattern and quote it for the shell")
        found.extend(matched)
    if not found:
        raise ValueError("no checkpoints given; pass checkpoint directories or --glob 'runs/NAME/checkpoints/step_*'")
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=_step_order)


def _step_order(path: Path) -> tuple[int, str]:
    name = path.name
    if name.startswith("step_") and name[5:].isdigit():
        return (int(name[5:]), str(path))
    return (10**12, str(path))


def checkpoint_hash(directory: Path) -> str:
    """Return a content hash of a checkpoint's weights and config, or of its path when unreadable."""
    digest = hashlib.sha256()
    for name in ("adapter.safetensors", "adapter_config.json"):
        path = directory / name
        if path.is_file():
            digest.update(path.read_bytes())
        else:
            digest.update(f"missing:{path}".encode())
    return digest.hexdigest()[:16]


class ResultsStore:
    """Parquet parts keyed by (checkpoint hash, metric set), plus the combined table."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.parts = self.directory / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)

    def part_path(self, checkpoint_key: str, metric_set: str) -> Path:
        return self.parts / f"{checkpoint_key}-{metric_set}.parquet"

    def has(self, checkpoint_key: str, metric_set: str) -> bool:
        return self.part_path(checkpoint_key, metric_set).is_file()

    def add(self, checkpoint_key: str, metric_set: str, frame: pd.DataFrame) -> None:
        write_parquet_atomic(frame, self.part_path(checkpoint_key, metric_set))

    def combined(self, metric_set: str | None = None) -> pd.DataFrame:
        pattern = f"*-{metric_set}.parquet" if metric_set else "*.parquet"
        frames = [pd.read_parquet(path) for path in sorted(self.parts.glob(pattern))]
        if not frames:
            return pd.DataFrame(columns=RESULT_COLUMNS + ["error"])
        return pd.concat(frames, ignore_index=True)


def _error_frame(checkpoint: str, treatment: str, message: str) -> pd.DataFrame:
    row = {column: np.nan for column in RESULT_COLUMNS}
    row.update({"checkpoint": checkpoint, "treatment": treatment, "layer": -1, "token_group": "", "metric": "error", "n": 0})
    row["error"] = message
    return pd.DataFrame([row])


def evaluate_adapter(evaluator: Evaluator, directory: Path, adapter, vision_tokens, name: str, treatment: str):
    """Evaluate a loaded checkpoint, with the LM's LoRA applied when the checkpoint carries one (`lm_lora/`).

    Returns:
        What `Evaluator.evaluate` returns.
    """
    if (Path(directory) / "lm_lora").is_dir():  # a treatment changed the LM too (self-adapting)
        from mmalign.loops.self_adapting import evaluate_with_lm_lora

        return evaluate_with_lm_lora(evaluator, Path(directory) / "lm_lora", adapter, vision_tokens, name, treatment)
    return evaluator.evaluate(adapter, vision_tokens, name, treatment)


def evaluate_checkpoints(
    evaluator: Evaluator,
    vision_tokens,
    checkpoints: list[tuple[str, Path, str]],
    store: ResultsStore,
    metric_set: str,
    expect_vision: dict,
    expect_lm: dict,
) -> dict[str, float]:
    """Evaluate each `(name, directory, treatment)` not yet in the store; return validation losses.

    A checkpoint that fails to load or evaluate is stored as an error row naming the
    problem, and the loop continues with the next one.
    """
    losses: dict[str, float] = {}
    for name, directory, treatment in checkpoints:
        key = checkpoint_hash(directory)
        if store.has(key, metric_set):
            logger.info("evaluate: %s already done (%s); skipped", name, key)
            continue
        start = time.perf_counter()
        try:
            adapter, _ = load_checkpoint(directory, expect_vision=expect_vision, expect_lm=expect_lm)
            frame, loss = evaluate_adapter(evaluator, directory, adapter, vision_tokens, name, treatment)
            frame["error"] = ""
            losses[name] = loss
            logger.info("evaluate: %s in %.1f s (validation caption loss %.4f)", name, time.perf_counter() - start, loss)
        except (CheckpointError, ValueError, RuntimeError, OSError) as error:
            logger.error("evaluate: %s failed: %s", name, error)
            frame = _error_frame(name, treatment, f"{type(error).__name__}: {error}")
        store.add(key, metric_set, frame)
    return losses


def metric_set_hash(config, probe_dir: Path, dataset_fingerprint: str, val_rows: list[int]) -> str:
    """Return the identity of everything that fixes the numbers of a checkpoint's results."""
    # The feature_* settings only choose report examples, so changing them reruns nothing.
    eval_settings = config.eval.model_dump(exclude={name for name in type(config.eval).model_fields if name.startswith("feature_")})
    return stable_hash([eval_settings, config.adapter.prompt_style, config.adapter.prompt_prefix,
                        config.adapter.chat_instruction, config.train.max_caption_tokens, str(probe_dir),
                        dataset_fingerprint, val_rows, config.seed, mmalign_version()])


def write_manifest(path: Path, manifest: dict) -> None:
    write_atomic(path, json.dumps(manifest, indent=2, default=str))
