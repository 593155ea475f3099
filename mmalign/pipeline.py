"""The main job: data -> vision features -> adapter training -> SAE probes -> evaluation -> report."""

from __future__ import annotations

import json
import logging
import platform
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from mmalign.adapters.base import Adapter
from mmalign.adapters.checkpoint import git_commit, load_checkpoint, mmalign_version, save_checkpoint
from mmalign.adapters.compose import PromptTemplate, build_prompt
from mmalign.adapters.registry import build_adapter
from mmalign.adapters.train import TrainingSetup, list_step_checkpoints, shuffled_pairing, train_adapter, validation_loss
from mmalign.assets import cache_dir
from mmalign.config import RunConfig
from mmalign.data import ImageCaptionDataset, load_dataset, split_train_val
from mmalign.evaluate import Evaluator
from mmalign.features import compute_vision_features
from mmalign.reports.results_io import write_results
from mmalign.io import StageTimer, stable_hash, write_atomic
from mmalign.lm import LanguageModel, describe_lm, load_lm
from mmalign.probes.corpus import iter_texts, open_text_sources
from mmalign.probes.sae import FIT_SUMMARY, default_layers, fit_sae_probes, load_pretrained_probes
from mmalign.vision import VisionEncoder, load_vision_encoder

logger = logging.getLogger("mmalign.pipeline")

CONTROL_NAMES = {
    "trained": "trained adapter",
    "untrained": "untrained adapter",
    "shuffled": "trained adapter, shuffled images",
}


@dataclass
class RunResult:
    """Output paths of a finished run and its headline numbers."""

    run_dir: Path
    report_path: Path
    results_path: Path
    controls: dict[str, float]
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class RunContext:
    """Frozen models, data, cached features and provenance shared by the stages of a run."""

    config: RunConfig
    run_dir: Path
    encoder: VisionEncoder
    lm: LanguageModel
    dataset: ImageCaptionDataset
    train_rows: list[int]
    val_rows: list[int]
    tokens: torch.Tensor  # [N, T, D] encoder outputs of every image
    prompt: PromptTemplate
    timer: StageTimer

    @property
    def train_captions(self) -> list[str]:
        return [self.dataset.items[i].caption for i in self.train_rows]

    @property
    def val_captions(self) -> list[str]:
        return [self.dataset.items[i].caption for i in self.val_rows]

    def checkpoint_metadata(self) -> dict[str, object]:
        """Return the provenance written into every adapter checkpoint of this run."""
        config = self.config
        return {
            "vision_encoder": self.encoder.describe(),
            "lm": describe_lm(self.lm),
            "prompt": {"style": config.adapter.prompt_style, "prefix": config.adapter.prompt_prefix,
                       "instruction": config.adapter.chat_instruction, "max_caption_tokens": config.train.max_caption_tokens},
            "dataset": {"name": self.dataset.name, "fingerprint": self.dataset.fingerprint(), "n_train": len(self.train_rows)},
            "train_config_hash": stable_hash([config.train.model_dump(), config.adapter.model_dump(), config.seed]),
        }

    def new_adapter(self) -> Adapter:
        """Build an untrained adapter, initialized from the run's seed."""
        adapter_config = self.config.adapter
        torch.manual_seed(self.config.seed)
        shape = {
            "kind": adapter_config.kind, "d_vision": self.encoder.d_model, "d_lm": self.lm.d_model,
            "pooled_grid": adapter_config.pooled_grid, "keep_cls": adapter_config.keep_cls,
            "has_cls_token": self.encoder.has_cls_token, "n_encoder_tokens": int(self.tokens.shape[1]),
            "dropout": adapter_config.dropout, "prefix_tokens": adapter_config.prefix_tokens,
            "hidden_dim": adapter_config.hidden_dim,
        }
        return build_adapter(shape)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_data(config: RunConfig) -> tuple[ImageCaptionDataset, list[int], list[int]]:
    dataset = load_dataset(config.data.spec, exclude_categories=tuple(config.data.exclude_categories))
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


def prepare_run(config: RunConfig, run_dir: Path | None = None, device: torch.device | None = None,
                write_config: bool = True) -> RunContext:
    """Load the frozen models, the data and the vision features (from the cache when present).

    Args:
        write_config: Write the resolved config to `run_dir/config.yaml` (off when a
            command works inside an existing run, such as `treat`).
    """
    run_dir = Path(run_dir) if run_dir else Path(config.output_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if write_config:
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(), sort_keys=False))
    seed_everything(config.seed)
    timer = StageTimer()
    with timer.stage("load models"):
        encoder = load_vision_encoder(config.vision_encoder.spec, config.vision_encoder.image_size, config.vision_encoder.layer)
        lm = load_lm(config.lm.spec)
        if device is not None:
            lm.model.to(device)
    with timer.stage("load data"):
        dataset, train_rows, val_rows = _load_data(config)
    with timer.stage("vision features"):
        tokens = compute_vision_features(encoder, dataset, cache_dir(), config.vision_encoder.batch_size)
    adapter_config = config.adapter
    prompt = build_prompt(lm, adapter_config.prompt_style, adapter_config.prompt_prefix, adapter_config.chat_instruction)
    return RunContext(config, run_dir, encoder, lm, dataset, train_rows, val_rows, tokens, prompt, timer)


def train_stage(context: RunContext, resume: bool = False, accelerator=None) -> Adapter:
    """Train the adapter, or reuse `checkpoints/final/` when it was made from the same config and data."""
    config = context.config
    metadata = context.checkpoint_metadata()
    final_dir = context.run_dir / "checkpoints" / "final"
    with context.timer.stage("train adapter"):
        if (final_dir / "adapter_config.json").is_file():
            saved, saved_meta = load_checkpoint(final_dir, expect_vision=context.encoder.describe(), expect_lm=metadata["lm"])
            if saved_meta.get("train_config_hash") == metadata["train_config_hash"] and saved_meta.get("dataset") == metadata["dataset"]:
                logger.info("train adapter: reusing %s (same config and data)", final_dir)
                return saved.eval()
        setup = TrainingSetup(
            context.lm, context.tokens[context.train_rows], context.train_captions,
            context.tokens[context.val_rows], context.val_captions, context.prompt,
            context.run_dir / "checkpoints", metadata, config.seed,
        )
        return train_adapter(context.new_adapter(), setup, config.train, resume=resume, accelerator=accelerator)


def control_losses(context: RunContext, adapter: Adapter) -> dict[str, float]:
    """Return validation caption losses of the untrained adapter and of shuffled images."""
    config = context.config
    val_tokens, val_captions = context.tokens[context.val_rows], context.val_captions
    args = (context.prompt, config.train.max_caption_tokens, config.eval.batch_size)
    with context.timer.stage("control losses"):
        return {
            CONTROL_NAMES["untrained"]: validation_loss(context.lm, context.new_adapter(), val_tokens, val_captions, *args),
            CONTROL_NAMES["shuffled"]: validation_loss(
                context.lm, adapter, val_tokens, val_captions, *args, image_order=shuffled_pairing(len(val_captions), config.seed)
            ),
        }


def probe_stage(context: RunContext) -> tuple[dict[int, "SAE"], Path, int]:
    """Fit the SAE probes (or reuse those already on disk); return them, their directory and the text count."""
    config, lm = context.config, context.lm
    layers = default_layers(lm.n_layers) if config.probes.layers == "default" else list(config.probes.layers)
    if config.probes.source != "fit":
        with context.timer.stage("load SAE probes"):
            probes = load_pretrained_probes(config.probes.source, lm, layers, config.probes.model_name)
        source_dir = Path(config.probes.source.partition(":")[2].split("{layer")[0] or ".")
        return probes, source_dir, 0
    with context.timer.stage("fit SAE probes"):
        sources = open_text_sources(config.probes.text_sources, wordnet_count=config.probes.wordnet_glosses,
                                    seed=config.seed, captions=context.train_captions)
        # Default settings hash as they did before text sources existed, so fitted probes stay in use.
        # File and dataset sources add what identifies their content.
        key_parts = [config.probes.hash_fields(), describe_lm(lm), context.dataset.fingerprint(), config.seed]
        content = [source.fingerprint for source in sources if source.fingerprint]
        probe_key = stable_hash(key_parts + [content] if content else key_parts)
        probe_dir = context.run_dir / "probes" / probe_key
        probes = fit_sae_probes(lm, sources, layers, config.probes, config.seed, probe_dir)
        summary_path = probe_dir / FIT_SUMMARY
        if summary_path.is_file():
            n_fit_texts = int(json.loads(summary_path.read_text())["n_fit_texts"])
        else:  # probes fitted before summaries were written: count the texts without running the LM
            n_fit_texts = sum(1 for _ in iter_texts(sources, config.probes.max_fit_texts))
    return probes, probe_dir, n_fit_texts


def build_manifest(context: RunContext, probe_dir: Path, n_fit_texts: int, checkpoints: dict[str, str]) -> dict[str, object]:
    """Return the provenance of a results table: models, data, probes, checkpoints and settings."""
    config, dataset = context.config, context.dataset
    if config.probes.source == "fit":
        architecture = {"standard": "standard (ReLU, L1)", "topk": f"topk (k={config.probes.k})", "jumprelu": "jumprelu (L0)"}
        probe_settings = {"source": "fit", "architecture": architecture[config.probes.architecture], "d_sae": config.probes.d_sae,
                          "text_sources": list(config.probes.text_sources), "steps": config.probes.steps}
    else:
        probe_settings = {"source": config.probes.source, "architecture": "as loaded (see each cfg.json)"}
    return {
        "mmalign_version": mmalign_version(),
        "git_commit": git_commit(),
        "vision_encoder": context.encoder.describe(),
        "lm": describe_lm(context.lm),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n_images": len(dataset),
                    "n_train": len(context.train_rows), "n_val": len(context.val_rows), "skipped": dict(dataset.skipped)},
        "probes": {"layers": sorted(int(p.name.removeprefix("layer_")) for p in probe_dir.glob("layer_*")),
                   "directory": str(probe_dir), **probe_settings, "n_fit_texts": n_fit_texts, "hash": stable_hash(sorted(str(p) for p in probe_dir.rglob("*.safetensors")))},
        "checkpoints": checkpoints,
        "dtype": "float32",
        "eval": config.eval.model_dump(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def evaluate_stage(context: RunContext, probes: dict, probe_dir: Path, n_fit_texts: int,
                   checkpoints: list[tuple[str, Path, str]]) -> tuple[pd.DataFrame, dict[str, float], dict[str, object]]:
    """Evaluate checkpoints into `results/`, write `results.parquet` and `manifest.json`; return the results."""
    from mmalign.batch_eval import ResultsStore, checkpoint_hash, evaluate_checkpoints, metric_set_hash

    config = context.config
    with context.timer.stage("evaluate"):
        evaluator = Evaluator(
            context.lm, probes, context.prompt, context.val_captions,
            [context.dataset.items[i].category for i in context.val_rows],
            config.train.max_caption_tokens, config.eval, config.seed,
        )
        store = ResultsStore(context.run_dir / "results")
        metric_set = metric_set_hash(config, probe_dir, context.dataset.fingerprint(), context.val_rows)
        losses = evaluate_checkpoints(
            evaluator, context.tokens[context.val_rows], checkpoints, store, metric_set,
            context.encoder.describe(), describe_lm(context.lm),
        )
        results = store.combined(metric_set)
        write_results(results, context.run_dir / "results.parquet")
    manifest = build_manifest(context, probe_dir, n_fit_texts,
                              {name: {"path": str(path), "hash": checkpoint_hash(path)} for name, path, _ in checkpoints})
    write_atomic(context.run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))
    return results, losses, manifest


def feature_examples_stage(context: RunContext, probes: dict, probe_dir: Path) -> dict[str, object] | None:
    """Describe the SAE latents and write `feature_examples.json` for a few validation images.

    Latent descriptions come from one LM pass over the fitting texts (`probes.text_sources`,
    at most `eval.feature_texts` of them) and are saved beside fitted probes, or under
    `feature_descriptions/` for loaded ones. The examples use `checkpoints/final/`, and a
    rerun with the same checkpoint, probes and settings reads the file back.

    Returns:
        The artifact, or None when `eval.feature_examples` is 0.
    """
    from mmalign.batch_eval import checkpoint_hash
    from mmalign.probes.descriptions import describe_sae_latents, image_feature_examples
    from mmalign.reports.features import FEATURES_FILE, FEATURES_FORMAT, encode_thumbnail

    config, lm = context.config, context.lm
    n_images = min(config.eval.feature_examples, len(context.val_rows))
    if n_images == 0:
        return None
    sources = open_text_sources(config.probes.text_sources, wordnet_count=config.probes.wordnet_glosses,
                                seed=config.seed, captions=context.train_captions)
    limits = [limit for limit in (config.eval.feature_texts, config.probes.max_fit_texts) if limit is not None]
    max_texts = min(limits) if limits else None
    corpus_id = stable_hash([config.probes.text_sources, config.probes.wordnet_glosses, config.seed, context.train_captions,
                             [source.fingerprint for source in sources], max_texts])
    directory = probe_dir if config.probes.source == "fit" else context.run_dir / "feature_descriptions"
    with context.timer.stage("feature descriptions"):
        descriptions = describe_sae_latents(lm, probes, iter_texts(sources, max_texts), directory, config.eval.feature_contexts,
                                            config.probes.lm_batch_size, config.probes.max_text_tokens, corpus_id=corpus_id)

    # Evenly spaced validation images, so the examples are not all from one end of the split.
    picks = sorted({int(i) for i in np.linspace(0, len(context.val_rows) - 1, n_images)})
    rows = [context.val_rows[i] for i in picks]
    final = context.run_dir / "checkpoints" / "final"
    settings = [config.eval.feature_top_k, config.eval.feature_max_density, config.train.max_caption_tokens, context.prompt]
    key = stable_hash([FEATURES_FORMAT, checkpoint_hash(final), {layer: record["key"] for layer, record in descriptions.items()},
                       rows, settings, mmalign_version()])
    path = context.run_dir / FEATURES_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            logger.warning("feature examples %s are unreadable (%s); writing them again", path, error)
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key:
            logger.info("feature examples: reusing %s", path)
            return saved
    with context.timer.stage("feature examples"):
        adapter, _ = load_checkpoint(final, expect_vision=context.encoder.describe(), expect_lm=describe_lm(lm))
        captions = [context.dataset.items[row].caption for row in rows]
        examples = image_feature_examples(
            lm, adapter, context.tokens[rows], captions, context.prompt, config.train.max_caption_tokens,
            probes, descriptions, config.eval.feature_top_k, config.eval.feature_max_density,
        )
        for row, image in zip(rows, examples["images"]):
            item = context.dataset.items[row]
            image.update(image_id=item.image_id, caption=item.caption, thumbnail_png_base64=encode_thumbnail(context.dataset.load_image(row)))
        examples = {"format": FEATURES_FORMAT, "key": key, "checkpoint": "final", **examples}
        write_atomic(path, json.dumps(examples, ensure_ascii=False))
    logger.info("feature examples: %d images x %d layers written to %s", len(rows), len(descriptions), path)
    return examples


def run_checkpoints(context: RunContext) -> list[tuple[str, Path, str]]:
    """Return the run's checkpoints to evaluate: the untrained null, step checkpoints (if enabled), final."""
    directory = context.run_dir / "checkpoints"
    untrained = directory / "untrained"
    if not (untrained / "adapter_config.json").is_file():
        save_checkpoint(context.new_adapter(), untrained, {**context.checkpoint_metadata(), "step": 0})
    listed = [("null:untrained", untrained, "none")]
    if context.config.eval.evaluate_steps:
        # The last step checkpoint has the same weights as final/, which is evaluated below.
        listed += [(path.name, path, "none") for step, path in list_step_checkpoints(directory) if step != context.config.train.steps]
    listed.append(("final", directory / "final", "none"))
    return listed


def run_pipeline(config: RunConfig, run_dir: Path | None = None) -> RunResult:
    """Run every stage of the main job and write the run directory.

    Outputs in the run directory: `config.yaml` (resolved), `checkpoints/`, `probes/`,
    `train_metrics.jsonl`, `results/` and `results.parquet`, `controls.json`,
    `manifest.json`, `feature_examples.json` and `report.html`.
    """
    from mmalign.reports.cli import read_samples
    from mmalign.reports.html import render_full_report, write_report

    context = prepare_run(config, run_dir)
    run_dir, timer = context.run_dir, context.timer
    adapter = train_stage(context)
    controls = control_losses(context, adapter)
    probes, probe_dir, n_fit_texts = probe_stage(context)
    results, _, manifest = evaluate_stage(context, probes, probe_dir, n_fit_texts, run_checkpoints(context))
    feature_examples = feature_examples_stage(context, probes, probe_dir)

    with timer.stage("control losses"):
        trained = validation_loss(context.lm, adapter, context.tokens[context.val_rows], context.val_captions,
                                  context.prompt, config.train.max_caption_tokens, config.eval.batch_size)
    controls = {CONTROL_NAMES["trained"]: trained, **controls}
    for name, value in controls.items():
        logger.info("validation caption loss, %s: %.4f nats/token", name, value)
    write_atomic(run_dir / "controls.json", json.dumps(controls, indent=2))

    with timer.stage("report"):
        metrics_log = run_dir / "train_metrics.jsonl"
        samples = read_samples(metrics_log) if metrics_log.is_file() else None
        html = render_full_report(
            results, title=f"mmalign alignment report: {config.name}", controls=controls,
            config=config.model_dump(), manifest=manifest, stage_times=dict(timer.seconds), samples=samples,
            feature_examples=feature_examples,
        )
        report_path = run_dir / "report.html"
        write_report(report_path, html)
    logger.info("report written to %s", report_path)
    return RunResult(run_dir, report_path, run_dir / "results.parquet", controls, dict(timer.seconds))
