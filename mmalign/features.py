"""The vision feature cache: encoder outputs computed once per (encoder, preprocessing, dataset)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmalign.data import ImageCaptionDataset
from mmalign.vision import VisionEncoder
from mmalign.progress import progress

logger = logging.getLogger("mmalign.features")


def feature_cache_key(encoder: VisionEncoder, dataset: ImageCaptionDataset) -> str:
    """Return the cache key; it changes when the encoder, its preprocessing or any input changes."""
    record = {"encoder": encoder.describe(), "dataset": dataset.fingerprint(), "format": 1}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=metadata)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


def compute_vision_features(
    encoder: VisionEncoder,
    dataset: ImageCaptionDataset,
    cache_root: Path,
    batch_size: int = 16,
) -> torch.Tensor:
    """Return the encoder's tokens for every image of `dataset`, from the cache when present.

    Args:
        encoder: The frozen vision encoder.
        dataset: The images, in the order the returned rows follow.
        cache_root: Directory holding `vision_features/<key>.safetensors`.
        batch_size: Images per encoder forward pass.

    Returns:
        `[N, T, D]` float32 tokens, row i for `dataset.items[i]`.
    """
    key = feature_cache_key(encoder, dataset)
    path = cache_root / "vision_features" / f"{key}.safetensors"
    if path.is_file():
        tokens = load_file(path)["tokens"]
        if tokens.shape[0] == len(dataset):
            logger.info("vision features: loaded %d images from cache %s", len(dataset), path)
            return tokens
        logger.warning("vision feature cache %s has %d rows for %d images; recomputing", path, tokens.shape[0], len(dataset))

    start = time.perf_counter()
    chunks = []
    indices = list(range(len(dataset)))
    for offset in progress(range(0, len(indices), batch_size), "vision features", "batch"):
        images = [dataset.load_image(i) for i in indices[offset : offset + batch_size]]
        chunks.append(encoder.encode(images).float())
    tokens = torch.cat(chunks).contiguous()  # [N, T, D]
    metadata = {"encoder": json.dumps(encoder.describe()), "dataset": dataset.name, "n_images": str(len(dataset))}
    _atomic_save({"tokens": tokens}, metadata, path)
    logger.info(
        "vision features: encoded %d images in %.1f s (%s), cached at %s",
        len(dataset), time.perf_counter() - start, tuple(tokens.shape), path,
    )
    return tokens
