"""The main job: data -> vision features -> adapter training -> SAE probes -> evaluation -> report."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import yaml

from mmalign.adapters.checkpoint import git_commit, load_checkpoint, mmalign_version, save_checkpoint
from mmalign.adapters.linear import LinearAdapter
from mmalign.adapters.train import shuffled_pairing, train_adapter, validation_loss
from mmalign.assets import cache_dir
from mmalign.config import RunConfig
from mmalign.data import ImageCaptionDataset, load_dataset, split_train_val
from mmalign.evaluate import collect_text_group, evaluate_checkpoint
from mmalign.features import compute_vision_features
from mmalign.lm import describe_lm, load_lm
from mmalign.probes.corpus import wordnet_glosses
from mmalign.probes.sae import default_layers, fit_sae_probes
from mmalign.vision import load_vision_encoder

logger = logging.getLogger("mmalign.pipeline")

CONTROL_NAMES = {
    "trained": "trained adapter",
    "untrained": "untrained adapter",
    "shuffled": "trained adapter, shuffled images",
}


@dataclass
class RunResult:
    """Where a run wrote its outputs, and its headline numbers."""

    run_dir: Path
    report_path: Path
    results_path: Path
    controls: dict[str, float]
    stage_seconds: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _stable_hash(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Write text to `path` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        frame.to_parquet(temp_name, index=False)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


class StageTimer:
    """Wall time per pipeline stage, logged as each stage ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        logger.info("stage %s: started", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            logger.info("stage %s: %.1f s", name, self.seconds[name])


def _load_data(config: RunConfig) -> tuple[ImageCaptionDataset, list[int], list[int]]:
    options: dict[str, object] = {"exclude_categories": tuple(config.data.exclude_categories)}
    dataset = load_dataset(config.data.spec, **options)
    if config.data.max_images is not None and len(dataset) > config.data.max_images:
        keep = sorted(random.Random(config.seed).sample(range(len(dataset)), config.data.max_images))
        dataset = dataset.subset(keep)
    train, val = split_train_val(dataset, config.data.val_fraction, config.seed)
    position = {item.image_id: index for index, item in enumerate(dataset.items)}
    train_rows = [position[item.image_id] for item in train.items]
    val_rows = [position[item.image_id] for item in val.items]
    skipped = ", ".join(f"{count} {reason}" for reason, count in dataset.skipped.items()) or "none"
    logger.info("data: %d pairs (%d train, %d validation); skipped: %s", len(dataset), len(train_rows), len(val_rows), skipped)
    return dataset, train_rows, val_rows


def run_pipeline(config: RunConfig, run_dir: Path | None = None) -> RunResult:
    """Run every stage of the main job and write the run directory.

    Outputs in the run directory: `config.yaml` (resolved), `checkpoints/final/`,
    `probes/layer_LL/`, `train_metrics.jsonl`, `results.parquet`, `controls.json`,
    `manifest.json` and `report.html`.
    """
    from mmalign.reports.html import render_report, write_report

    run_dir = Path(run_dir) if run_dir else Path(config.output_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(), sort_keys=False))
    seed_everything(config.seed)
    timer = StageTimer()

    with timer.stage("load models"):
        encoder = load_vision_encoder(config.vision_encoder.spec, config.vision_encoder.image_size)
        lm = load_lm(config.lm.spec)
    with timer.stage("load data"):
        dataset, train_rows, val_rows = _load_data(config)
    with timer.stage("vision features"):
        tokens = compute_vision_features(encoder, dataset, cache_dir(), config.vision_encoder.batch_size)
    train_tokens, val_tokens = tokens[train_rows], tokens[val_rows]
    train_captions = [dataset.items[i].caption for i in train_rows]
    val_captions = [dataset.items[i].caption for i in val_rows]

    lm_facts = describe_lm(lm)
    checkpoint_meta = {
        "vision_encoder": encoder.describe(),
        "lm": lm_facts,
        "prompt": {"prefix": config.adapter.prompt_prefix, "max_caption_tokens": config.train.max_caption_tokens,
                   "layout": "[start] [visual tokens] [prefix] [caption] [end]"},
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n_train": len(train_rows)},
        "train_config_hash": _stable_hash([config.train.model_dump(), config.adapter.model_dump(), config.seed]),
    }

    with timer.stage("train adapter"):
        torch.manual_seed(config.seed)
        adapter = LinearAdapter(encoder.d_model, lm.d_model, config.adapter.pooled_grid, config.adapter.keep_cls, encoder.has_cls_token)
        untrained = LinearAdapter(encoder.d_model, lm.d_model, config.adapter.pooled_grid, config.adapter.keep_cls, encoder.has_cls_token)
        untrained.load_state_dict(adapter.state_dict())
        final_dir = run_dir / "checkpoints" / "final"
        reused = False
        if (final_dir / "adapter_config.json").is_file():
            saved, saved_meta = load_checkpoint(final_dir, expect_vision=encoder.describe(), expect_lm=lm_facts)
            if saved_meta.get("train_config_hash") == checkpoint_meta["train_config_hash"] and saved_meta.get("dataset") == checkpoint_meta["dataset"]:
                adapter, reused = saved, True
                logger.info("train adapter: reusing %s (same config and data)", final_dir)
        if not reused:
            metrics_path = run_dir / "train_metrics.jsonl"
            metrics_path.unlink(missing_ok=True)
            train_adapter(lm, adapter, train_tokens, train_captions, config.adapter, config.train, config.seed, metrics_path)
            save_checkpoint(adapter, final_dir, {**checkpoint_meta, "step": config.train.steps})

    with timer.stage("control losses"):
        loss_args = (config.adapter, config.train.max_caption_tokens, config.eval.batch_size)
        controls = {
            CONTROL_NAMES["untrained"]: validation_loss(lm, untrained, val_tokens, val_captions, *loss_args),
            CONTROL_NAMES["shuffled"]: validation_loss(
                lm, adapter, val_tokens, val_captions, *loss_args, image_order=shuffled_pairing(len(val_captions), config.seed)
            ),
        }

    layers = default_layers(lm.n_layers) if config.probes.layers == "default" else list(config.probes.layers)
    with timer.stage("fit SAE probes"):
        texts = wordnet_glosses(config.probes.wordnet_glosses, config.seed) + train_captions
        probe_key = _stable_hash([config.probes.model_dump(), lm_facts, dataset.fingerprint(), config.seed])
        probes = fit_sae_probes(lm, texts, layers, config.probes, config.seed, run_dir / "probes" / probe_key)

    with timer.stage("evaluate"):
        text_states = collect_text_group(
            lm, val_captions, probes, config.adapter.prompt_prefix, config.train.max_caption_tokens, config.eval.batch_size
        )
        results, trained_loss = evaluate_checkpoint(
            lm, adapter, val_tokens, val_captions, probes, text_states,
            checkpoint="final", prefix=config.adapter.prompt_prefix, max_caption_tokens=config.train.max_caption_tokens,
            batch_size=config.eval.batch_size, n_bootstrap=config.eval.n_bootstrap, ci_level=config.eval.ci_level, seed=config.seed,
        )
        controls = {CONTROL_NAMES["trained"]: trained_loss, **controls}
        for name, value in controls.items():
            logger.info("validation caption loss, %s: %.4f nats/token", name, value)
        results_path = run_dir / "results.parquet"
        write_parquet_atomic(results, results_path)
        write_atomic(run_dir / "controls.json", json.dumps(controls, indent=2))

    manifest = {
        "mmalign_version": mmalign_version(),
        "git_commit": git_commit(),
        "vision_encoder": encoder.describe(),
        "lm": lm_facts,
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n_images": len(dataset),
                    "n_train": len(train_rows), "n_val": len(val_rows), "skipped": dict(dataset.skipped)},
        "probes": {"layers": layers, "directory": str(run_dir / "probes" / probe_key), "architecture": "standard (ReLU, L1)",
                   "d_sae": config.probes.d_sae, "n_fit_texts": len(texts)},
        "checkpoints": {"final": str(final_dir)},
        "dtype": "float32",
        "eval_batch_size": config.eval.batch_size,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    write_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))

    with timer.stage("report"):
        html = render_report(
            results, title=f"mmalign alignment report: {config.name}", controls=controls,
            config=config.model_dump(), manifest=manifest, stage_times=dict(timer.seconds),
        )
        report_path = run_dir / "report.html"
        write_report(report_path, html)
    logger.info("report written to %s", report_path)
    return RunResult(run_dir, report_path, results_path, controls, dict(timer.seconds))
