"""Benchmark batch evaluation of adapter checkpoints: mmalign's `Evaluator` against a naive loop.

Prints, side by side in one run, for N checkpoints (default 20):
  1. wall time of each arm and the speedup of mmalign's way over the naive way, also
     without the time mmalign spends on metrics that the naive arm skips;
  2. the maximum absolute difference between the arms over the headline metrics, and a
     failure when it exceeds 1e-5. The headline metrics are SAE MSE, FVU and L0 of the
     image, caption and text token groups, and linear CKA between mean image tokens and
     mean text-only caption tokens, each as point value and both interval ends;
  3. the peak RSS of the mmalign arm evaluating 1 checkpoint against N checkpoints.

mmalign's way (`prepare_run`, `probe_stage`, `Evaluator`, `evaluate_checkpoints`): the
frozen models, the probes and the vision feature cache load once, the text-only group is
computed once, and each checkpoint costs one LM pass per batch capturing every probed layer.
The naive way is written here. For each checkpoint it loads the vision encoder, the LM and
the probes again and encodes the validation images again. It then runs two LM passes per
batch and probed layer, one with the image and one text-only, each capturing only that layer.

Each arm runs in a child process of this script, one after the other, and is timed from
before its models load to its last metric, leaving out Python imports. Both arms use the
same models, data, probes, batch size, bootstrap resamples and thread limit.

Setup: the bundled DINOv2-S (112 px, 2x2 pooled grid plus CLS) and SmolLM2-135M, Tux Paint
stamps when /usr/share/tuxpaint exists (else the pip-only samples), SAE probes fitted for a
few steps on the training captions, and N checkpoints saved as seeded random perturbations
of one freshly initialized linear adapter. Everything is written under a temporary folder.

Run: MMALIGN_CACHE_DIR=/tmp/mmcache .venv/bin/python bench/batch_eval.py \
    [--checkpoints 20] [--images 32] [--layers 0 3 6 ... 27 29] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from mmalign import evaluate as evaluate_module
from mmalign.adapters.checkpoint import load_checkpoint, save_checkpoint
from mmalign.adapters.compose import build_prompt, compose
from mmalign.batch_eval import ResultsStore, evaluate_checkpoints, metric_set_hash
from mmalign.config import RunConfig, parse_config
from mmalign.data import load_dataset
from mmalign.evaluate import Evaluator
from mmalign.lm import LanguageModel, describe_lm, load_lm
from mmalign.pipeline import prepare_run, probe_stage
from mmalign.probes.fidelity import FidelityStats, fidelity_metrics
from mmalign.probes.metrics import bootstrap_counts
from mmalign.probes.similarity import linear_cka_with_ci
from mmalign.probes.sae import load_sae_probe
from mmalign.vision import load_vision_encoder

TUXPAINT_DIR = Path("/usr/share/tuxpaint")
SAE_METRICS = ("sae_mse", "sae_fvu", "sae_l0")
SAE_GROUPS = ("image", "caption", "text")
KEY_COLUMNS = ["checkpoint", "layer", "token_group", "metric"]
VALUE_COLUMNS = ["value", "ci_low", "ci_high"]
MAX_ABS_DIFFERENCE = 1e-5
TARGET_SPEEDUP = 10.0
TARGET_MEMORY_RATIO = 1.2
PERTURBATION_STD = 0.01  # absolute std of the Gaussian noise added to every adapter weight


def build_config(work_dir: Path, n_images: int, layers: list[int]) -> RunConfig:
    """Return a `configs/quick.yaml`-like run config with `n_images` validation images and fast settings."""
    data_spec = "tuxpaint" if TUXPAINT_DIR.is_dir() else "samples"
    return parse_config({
        "name": "bench-batch-eval",
        "seed": 0,
        "output_dir": str(work_dir),
        "vision_encoder": {"spec": "bundled:dinov2-small", "image_size": 112, "batch_size": 8},
        "lm": {"spec": "bundled:smollm2-135m"},
        # Half of 2 * n_images held out gives n_images validation images when the dataset is that large.
        "data": {"spec": data_spec, "max_images": 2 * n_images, "val_fraction": 0.5},
        "adapter": {"pooled_grid": 2},
        "probes": {"layers": layers, "d_sae": 256, "steps": 30, "batch_tokens": 256, "wordnet_glosses": 0},
        # The splice scores and bits per byte add LM passes of their own, which the naive arm does not reproduce.
        "eval": {"batch_size": 8, "n_bootstrap": 50, "splice_images": 0, "bits_per_byte_images": 0},
    }, source="bench/batch_eval.py")


def prepare(work_dir: Path, n_checkpoints: int, n_images: int, layers: list[int]) -> dict:
    """Fit the probes, fill the vision feature cache and save the checkpoints. Return the setup record."""
    config = build_config(work_dir, n_images, layers)
    context = prepare_run(config)
    _, probe_dir, _ = probe_stage(context)

    metadata = context.checkpoint_metadata()
    checkpoints = []
    for index in range(n_checkpoints):
        generator = torch.Generator().manual_seed(index)
        adapter = context.new_adapter()  # the same initial weights every time, from the run's seed
        with torch.no_grad():
            for parameter in adapter.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * PERTURBATION_STD)
        directory = work_dir / "checkpoints" / f"perturbed_{index:02d}"
        save_checkpoint(adapter, directory, {**metadata, "step": index})
        checkpoints.append(str(directory))

    return {
        "config": config.model_dump(),
        "run_dir": str(context.run_dir),
        "probe_dir": str(probe_dir),
        "layers": sorted(layers),
        "checkpoints": checkpoints,
        "dataset": context.dataset.name,
        "val_image_ids": [context.dataset.items[i].image_id for i in context.val_rows],
    }


def headline_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Select the headline metrics from an `Evaluator` results table."""
    sae = results["token_group"].isin(SAE_GROUPS) & results["metric"].isin(SAE_METRICS)
    cka = (results["token_group"] == "pair") & (results["metric"] == "cka_linear")
    return results.loc[sae | cka, KEY_COLUMNS + VALUE_COLUMNS].reset_index(drop=True)


def time_extra_metrics(seconds: dict[str, float]) -> None:
    """Wrap the `mmalign.evaluate` metric functions that the naive arm does not reproduce with timers.

    `seconds["extra"]` accumulates their time less that of the linear CKA called inside
    `pair_metrics`, which both arms compute. `Evaluator.evaluate` looks these names up in
    its module at call time, so the wrappers see every call.
    """
    seconds.setdefault("extra", 0.0)

    def wrap(name: str, sign: float) -> None:
        function = getattr(evaluate_module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds["extra"] += sign * (time.perf_counter() - start)

        setattr(evaluate_module, name, timed)

    for name in ("pair_metrics", "ratio_metrics", "feature_overlap", "linear_probe_metrics"):
        wrap(name, 1.0)
    wrap("linear_cka_with_ci", -1.0)


def run_mmalign_arm(setup: dict, n_checkpoints: int, store_dir: Path) -> tuple[pd.DataFrame, int]:
    """Evaluate the first `n_checkpoints` checkpoints the way `mmalign run` does.

    Returns:
        The headline rows and the number of LM passes.
    """
    config = parse_config(setup["config"])
    context = prepare_run(config, Path(setup["run_dir"]))
    probes, probe_dir, _ = probe_stage(context)
    evaluator = Evaluator(
        context.lm, probes, context.prompt, context.val_captions,
        [context.dataset.items[i].category for i in context.val_rows],
        config.train.max_caption_tokens, config.eval, config.seed,
    )
    store = ResultsStore(store_dir)
    metric_set = metric_set_hash(config, probe_dir, context.dataset.fingerprint(), context.val_rows)
    listed = [(Path(path).name, Path(path), "none") for path in setup["checkpoints"][:n_checkpoints]]
    evaluate_checkpoints(
        evaluator, context.tokens[context.val_rows], listed, store, metric_set,
        context.encoder.describe(), describe_lm(context.lm),
    )
    results = store.combined(metric_set)
    failed = results[results["metric"] == "error"]
    if not failed.empty:
        raise RuntimeError(f"mmalign arm: checkpoints failed to evaluate: {failed[['checkpoint', 'error']].to_dict('records')}")
    n_batches = -(-len(context.val_rows) // config.eval.batch_size)
    return headline_rows(results), n_batches * (n_checkpoints + 1)  # the text-only group once, then each checkpoint


class _NaiveGroup:
    """SAE statistics and per-image mean hidden states of one token group at one layer."""

    def __init__(self, n_images: int, sae) -> None:
        self.sae = sae
        d_model = int(sae.cfg.d_in)
        self.stats = FidelityStats.zeros(n_images, d_model, int(sae.cfg.d_sae))
        self.sums = torch.zeros(n_images, d_model, dtype=torch.float64)
        self.counts = torch.zeros(n_images, dtype=torch.float64)

    def add(self, hidden: torch.Tensor, mask: torch.Tensor, first_image: int) -> None:
        """Add the positions of `hidden` `[B, L, D]` selected by `mask` `[B, L]`. Batch row b is image `first_image + b`."""
        rows, positions = mask.cpu().nonzero(as_tuple=True)
        tokens = hidden.float().cpu()[rows, positions]  # [M, D]
        images = rows + first_image  # [M]
        with torch.no_grad():
            latents = self.sae.encode(tokens)  # [M, d_sae]
            reconstruction = self.sae.decode(latents)  # [M, D]
        self.stats.update(tokens, reconstruction, latents, images)
        self.sums.index_add_(0, images, tokens.double())
        self.counts.index_add_(0, images, torch.ones(images.shape[0], dtype=torch.float64))

    def means(self) -> np.ndarray:
        return (self.sums / self.counts.clamp(min=1).unsqueeze(1)).numpy()  # [N, D]


@torch.no_grad()
def forward_one_layer(lm: LanguageModel, batch, layer: int) -> torch.Tensor:
    """Run the whole LM on `batch` and return the output of decoder block `layer`, `[B, L, D]`."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = lm.layer_modules()[layer].register_forward_hook(hook)
    try:
        lm.model.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    finally:
        handle.remove()
    return captured["hidden"]


def naive_checkpoint_rows(
    setup: dict, config: RunConfig, dataset, val_indices: list[int], directory: Path, seconds: dict[str, float]
) -> list[list]:
    """Evaluate one checkpoint from scratch: load models and probes, encode images, two LM passes per batch and layer."""
    load_start = time.perf_counter()
    encoder = load_vision_encoder(config.vision_encoder.spec, config.vision_encoder.image_size, config.vision_encoder.layer)
    lm = load_lm(config.lm.spec)
    adapter_config = config.adapter
    prompt = build_prompt(lm, adapter_config.prompt_style, adapter_config.prompt_prefix, adapter_config.chat_instruction)
    probe_dir = Path(setup["probe_dir"])
    probes = {layer: load_sae_probe(probe_dir / f"layer_{layer:02d}", lm, layer) for layer in setup["layers"]}

    n_images = len(val_indices)
    captions = [dataset.items[i].caption for i in val_indices]
    encode_size = config.vision_encoder.batch_size
    chunks = []
    for start in range(0, n_images, encode_size):
        images = [dataset.load_image(i) for i in val_indices[start : start + encode_size]]
        chunks.append(encoder.encode(images).float())
    vision_tokens = torch.cat(chunks)  # [N, T, D_vision]
    seconds["loading"] = seconds.get("loading", 0.0) + time.perf_counter() - load_start

    adapter, _ = load_checkpoint(directory)
    adapter.eval()
    counts = bootstrap_counts(n_images, config.eval.n_bootstrap, config.seed)
    ci_level = config.eval.ci_level
    batch_size = config.eval.batch_size
    max_tokens = config.train.max_caption_tokens
    rows = []
    for layer in setup["layers"]:
        groups = {name: _NaiveGroup(n_images, probes[layer]) for name in SAE_GROUPS}
        for start in range(0, n_images, batch_size):
            stop = min(start + batch_size, n_images)
            with torch.no_grad():
                visual = adapter(vision_tokens[start:stop])  # [B, V, D]
            with_image = compose(lm, captions[start:stop], prompt, max_tokens, visual)
            hidden = forward_one_layer(lm, with_image, layer)
            groups["image"].add(hidden, with_image.image_mask, start)
            groups["caption"].add(hidden, with_image.caption_mask, start)
            text_only = compose(lm, captions[start:stop], prompt, max_tokens, None)
            groups["text"].add(forward_one_layer(lm, text_only, layer), text_only.caption_mask, start)

        for name, group in groups.items():
            metrics = fidelity_metrics(group.stats, counts, ci_level)
            for metric in SAE_METRICS:
                value = metrics[metric]
                rows.append([directory.name, layer, name, metric, value.value, value.ci_low, value.ci_high])
        cka = linear_cka_with_ci(groups["image"].means(), groups["text"].means(), counts, ci_level)
        rows.append([directory.name, layer, "pair", "cka_linear", cka.value, cka.ci_low, cka.ci_high])
    return rows


def run_naive_arm(setup: dict, n_checkpoints: int, seconds: dict[str, float]) -> tuple[pd.DataFrame, int]:
    """Evaluate the first `n_checkpoints` checkpoints the naive way.

    `seconds["loading"]` accumulates the time spent loading models and probes and encoding images.

    Returns:
        The headline rows and the number of LM passes.
    """
    config = parse_config(setup["config"])
    dataset = load_dataset(config.data.spec, exclude_categories=tuple(config.data.exclude_categories))
    position = {item.image_id: index for index, item in enumerate(dataset.items)}
    val_indices = [position[image_id] for image_id in setup["val_image_ids"]]
    rows = []
    for path in setup["checkpoints"][:n_checkpoints]:
        rows.extend(naive_checkpoint_rows(setup, config, dataset, val_indices, Path(path), seconds))
        gc.collect()  # drop the previous checkpoint's models before the next load
    n_batches = -(-len(val_indices) // config.eval.batch_size)
    n_passes = n_checkpoints * len(setup["layers"]) * 2 * n_batches
    return pd.DataFrame(rows, columns=KEY_COLUMNS + VALUE_COLUMNS), n_passes


def child_main(arm: str, work_dir: Path, n_checkpoints: int) -> None:
    """Run one arm in this process and write its headline rows and measurements under `work_dir`."""
    setup = json.loads((work_dir / "setup.json").read_text(encoding="utf-8"))
    load_start = os.getloadavg()[0]
    breakdown: dict[str, float] = {}
    start = time.perf_counter()
    if arm == "mmalign":
        time_extra_metrics(breakdown)
        # A fresh results store, because the store skips checkpoints it already holds.
        store_dir = Path(tempfile.mkdtemp(prefix="results-", dir=work_dir))
        rows, n_passes = run_mmalign_arm(setup, n_checkpoints, store_dir)
    else:
        rows, n_passes = run_naive_arm(setup, n_checkpoints, breakdown)
    seconds = time.perf_counter() - start
    stem = work_dir / f"{arm}-{n_checkpoints}"
    rows.to_parquet(stem.with_suffix(".parquet"))
    record = {
        "seconds": seconds,
        "lm_passes": n_passes,
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
        "load_average": [load_start, os.getloadavg()[0]],
        "torch_threads": torch.get_num_threads(),
        "breakdown_seconds": breakdown,
    }
    stem.with_suffix(".json").write_text(json.dumps(record), encoding="utf-8")


def run_child(arm: str, work_dir: Path, n_checkpoints: int, threads: int | None) -> tuple[dict, pd.DataFrame]:
    """Run one arm in a fresh Python process and return its measurements and headline rows."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--work-dir", str(work_dir),
               "--checkpoints", str(n_checkpoints)]
    if threads is not None:
        command += ["--threads", str(threads)]
    subprocess.run(command, check=True)
    stem = work_dir / f"{arm}-{n_checkpoints}"
    record = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    return record, pd.read_parquet(stem.with_suffix(".parquet"))


def compare(mmalign_rows: pd.DataFrame, naive_rows: pd.DataFrame) -> tuple[float, int]:
    """Return the maximum absolute difference over the headline values and their count.

    Raises:
        RuntimeError: when the arms produced different sets of (checkpoint, layer, group, metric).
    """
    merged = mmalign_rows.merge(naive_rows, on=KEY_COLUMNS, how="outer", suffixes=("_mmalign", "_naive"), indicator=True)
    unmatched = merged[merged["_merge"] != "both"]
    if not unmatched.empty:
        raise RuntimeError(f"the arms computed different metrics; unmatched rows:\n{unmatched[KEY_COLUMNS + ['_merge']]}")
    differences = [
        (merged[f"{column}_mmalign"] - merged[f"{column}_naive"]).abs().to_numpy() for column in VALUE_COLUMNS
    ]
    stacked = np.concatenate(differences)
    if np.isnan(stacked).any():
        # NaN in one arm only is a mismatch; NaN in both is the same result.
        one_sided = np.concatenate([
            merged[f"{column}_mmalign"].isna().to_numpy() != merged[f"{column}_naive"].isna().to_numpy()
            for column in VALUE_COLUMNS
        ])
        if one_sided.any():
            raise RuntimeError("a headline value is NaN in one arm and finite in the other")
    return float(np.nanmax(stacked)), int(stacked.size)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=20, help="Number of checkpoints to evaluate in each arm.")
    parser.add_argument("--images", type=int, default=32,
                        help="Validation images (fewer when the dataset has under twice as many).")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29],
                        help="LM layers to probe (SmolLM2-135M has layers 0..29); the default is the demo's set, "
                             "every third layer and the last.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch, BLAS and OpenMP threads in each arm's process (default: the libraries' defaults, "
                             "usually one per core).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder and print its path.")
    parser.add_argument("--child", choices=["mmalign", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoints < 1:
        parser.error(f"--checkpoints must be at least 1, got {args.checkpoints}")
    if args.images < 4:
        parser.error(f"--images must be at least 4 (CKA intervals and k-NN metrics need them), got {args.images}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def report(args: argparse.Namespace, setup: dict, single: dict, batched: dict, naive: dict,
           difference: float, n_values: int) -> list[str]:
    """Print the measurements and return the targets that were missed."""
    n = args.checkpoints
    mib = 1024.0
    speedup = naive["seconds"] / batched["seconds"]
    memory_ratio = batched["max_rss_kib"] / single["max_rss_kib"]
    print(f"batch evaluation of {n} checkpoints: {len(setup['val_image_ids'])} validation images "
          f"({setup['dataset']}), layers {setup['layers']}, torch threads {batched['torch_threads']}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'arm':<22}{'wall s':>9}{'s/checkpoint':>14}{'LM passes':>11}{'peak RSS MiB':>14}{'load avg start-end':>20}")
    for name, record, count in (("mmalign, 1 checkpoint", single, 1), (f"mmalign, {n} checkpoints", batched, n),
                                (f"naive, {n} checkpoints", naive, n)):
        load = "{:.1f}-{:.1f}".format(*record["load_average"])
        print(f"{name:<22}{record['seconds']:>9.1f}{record['seconds'] / count:>14.2f}{record['lm_passes']:>11}"
              f"{record['max_rss_kib'] / mib:>14.0f}{load:>20}")
    if n > 1:
        marginal = (batched["seconds"] - single["seconds"]) / (n - 1)
        print(f"mmalign cost of each further checkpoint: {marginal:.2f} s")
    print(f"speedup, naive / mmalign wall time: {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x)")
    extra = batched["breakdown_seconds"]["extra"]
    print(f"  mmalign spent {extra:.1f} s on metrics the naive arm skips (pair metrics besides linear CKA, "
          f"image/text ratios, feature overlap, linear probe); without them: "
          f"{naive['seconds'] / (batched['seconds'] - extra):.1f}x")
    print(f"  naive spent {naive['breakdown_seconds']['loading']:.1f} s loading models and probes and encoding images")
    print(f"max abs difference over {n_values} headline values: {difference:.3g} (limit {MAX_ABS_DIFFERENCE:g})")
    print(f"peak RSS, {n} checkpoints / 1 checkpoint: {memory_ratio:.3f}x (target <= {TARGET_MEMORY_RATIO}x)")
    missed = []
    if speedup < TARGET_SPEEDUP:
        missed.append(f"speedup {speedup:.1f}x is below {TARGET_SPEEDUP:.0f}x")
    if memory_ratio > TARGET_MEMORY_RATIO:
        missed.append(f"memory ratio {memory_ratio:.3f}x is above {TARGET_MEMORY_RATIO}x")
    return missed


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        # The limit covers NumPy's BLAS and scikit-learn too, which torch.set_num_threads does not.
        with threadpool_limits(limits=args.threads):
            child_main(args.child, args.work_dir, args.checkpoints)
        return

    work_dir = Path(tempfile.mkdtemp(prefix="mmalign-bench-batch-eval-"))
    try:
        setup = prepare(work_dir, args.checkpoints, args.images, args.layers)
        (work_dir / "setup.json").write_text(json.dumps(setup, indent=2), encoding="utf-8")
        gc.collect()
        single, _ = run_child("mmalign", work_dir, 1, args.threads)
        batched, mmalign_rows = run_child("mmalign", work_dir, args.checkpoints, args.threads)
        naive, naive_rows = run_child("naive", work_dir, args.checkpoints, args.threads)
        difference, n_values = compare(mmalign_rows, naive_rows)
        missed = report(args, setup, single, batched, naive, difference, n_values)
    finally:
        if args.keep:
            print(f"work folder kept at {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    if difference > MAX_ABS_DIFFERENCE:
        raise SystemExit(f"FAILED: the arms differ by {difference:.3g}, above {MAX_ABS_DIFFERENCE:g}; "
                         "rerun with --keep and compare mmalign-N.parquet with naive-N.parquet in the work folder")
    for line in missed:
        print(f"target missed: {line}")


if __name__ == "__main__":
    main()
