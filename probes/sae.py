"""SAE probes on the LM's residual stream: fitted with sae-lens's SAE classes, saved in its format.

A probe for layer L reads the output of decoder block L (`blocks.L.hook_resid_post` in
sae-lens and TransformerLens naming). Its `cfg.json` metadata records the LM id and hook,
and applying it to another LM or layer raises `ProbeMismatchError`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata, TrainStepInput

from mmalign.capture import capture_resid_post
from mmalign.adapters.compose import ComposedBatch
from mmalign.config import ProbesConfig
from mmalign.lm import LanguageModel
from mmalign.progress import progress

logger = logging.getLogger("mmalign.probes")


class ProbeMismatchError(ValueError):
    """An SAE probe applied to an LM, layer or width it was not made for."""


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def default_layers(n_layers: int) -> list[int]:
    """Return every third layer from 0 and the last layer."""
    layers = list(range(0, n_layers, 3))
    if layers[-1] != n_layers - 1:
        layers.append(n_layers - 1)
    return layers


@torch.no_grad()
def collect_text_activations(
    lm: LanguageModel, texts: list[str], layers: list[int], batch_size: int, max_tokens: int
) -> dict[int, torch.Tensor]:
    """Run texts through the LM and return each layer's residual stream at every text token.

    Each text is run as `[start] text`; the start position (an attention sink with very
    large norm) and padding are left out.

    Returns:
        layer -> `[M, D]` activations of the M text tokens.
    """
    encoded = [lm.tokenizer(text, add_special_tokens=False).input_ids[:max_tokens] for text in texts]
    encoded = [ids for ids in encoded if ids]
    encoded.sort(key=len)  # batches of similar length waste less padding
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in progress(range(0, len(encoded), batch_size), "text activations", "batch"):
        chunk = encoded[start : start + batch_size]
        length = 1 + max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), length), lm.end_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, : 1 + len(ids)] = torch.tensor([lm.start_token_id] + ids)
            attention_mask[row, : 1 + len(ids)] = 1
        keep = attention_mask.bool().clone()
        keep[:, 0] = False
        device = lm.model.device
        batch = ComposedBatch(lm.embed(input_ids.to(device)), attention_mask.to(device), input_ids, keep, keep)
        hidden = capture_resid_post(lm, batch, layers)
        for layer in layers:
            collected[layer].append(hidden[layer].float().cpu()[keep])
    return {layer: torch.cat(chunks) for layer, chunks in collected.items()}


def fit_sae(activations: torch.Tensor, config: ProbesConfig, seed: int, metadata: dict[str, object]) -> StandardTrainingSAE:
    """Fit a ReLU SAE with an L1 penalty (sae-lens `standard` architecture) on `[M, D]` activations.

    Inputs are scaled so the mean squared distance from their mean is D during fitting,
    so the L1 penalty weighs the same against reconstruction at every layer, whatever the
    size of the residual stream's constant component. The scale is folded into the
    weights afterwards, so the returned SAE reads raw activations.
    """
    torch.manual_seed(seed)
    d_in = activations.shape[1]
    centered = activations.double() - activations.double().mean(dim=0)
    scale = float(torch.sqrt(d_in / (centered**2).sum(dim=1).mean()))
    scaled = activations * scale
    sae_config = StandardTrainingSAEConfig(
        d_in=d_in, d_sae=config.d_sae, l1_coefficient=config.l1_coefficient, metadata=SAEMetadata(**metadata)
    )
    sae = StandardTrainingSAE(sae_config)
    with torch.no_grad():
        sae.b_dec.copy_(scaled.mean(dim=0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(config.steps):
        rows = torch.randint(0, scaled.shape[0], (config.batch_tokens,), generator=generator)
        output = sae.training_forward_pass(
            TrainStepInput(
                sae_in=scaled[rows], coefficients={"l1": config.l1_coefficient},
                dead_neuron_mask=None, n_training_steps=step, is_logging_step=False,
            )
        )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
    sae.fold_activation_norm_scaling_factor(scale)
    return sae


def _save_atomically(sae: StandardTrainingSAE, directory: Path) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        sae.save_inference_model(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_sae_probe(directory: Path, lm: LanguageModel, layer: int) -> SAE:
    """Open an SAE in sae-lens's on-disk format and check it was made for this LM and layer.

    Raises:
        FileNotFoundError: when the directory has no `cfg.json`.
        ProbeMismatchError: when the recorded LM, hook or width differs from the request.
    """
    if not (Path(directory) / "cfg.json").is_file():
        raise FileNotFoundError(f"no SAE probe at {directory} (cfg.json missing)")
    sae = SAE.load_from_disk(directory)
    recorded_model = sae.cfg.metadata.get("model_name")
    recorded_hook = sae.cfg.metadata.get("hook_name")
    if recorded_model != lm.lm_id:
        raise ProbeMismatchError(f"SAE probe {directory} was fitted on LM {recorded_model!r}, not {lm.lm_id!r}; refit it for this LM")
    if recorded_hook != hook_name(layer):
        raise ProbeMismatchError(f"SAE probe {directory} reads {recorded_hook!r}, not {hook_name(layer)!r}")
    if sae.cfg.d_in != lm.d_model:
        raise ProbeMismatchError(f"SAE probe {directory} has d_in {sae.cfg.d_in}, but {lm.lm_id} has d_model {lm.d_model}")
    sae.eval()
    return sae


def fit_sae_probes(
    lm: LanguageModel, texts: list[str], layers: list[int], config: ProbesConfig, seed: int, directory: Path
) -> dict[int, SAE]:
    """Fit (or reuse) one SAE probe per layer and save each under `directory/layer_LL/`.

    Probes already on disk for this LM and layer are loaded, not refitted, so an
    interrupted fit resumes with the missing layers.
    """
    probes: dict[int, SAE] = {}
    missing = []
    for layer in layers:
        path = directory / f"layer_{layer:02d}"
        if (path / "cfg.json").is_file():
            probes[layer] = load_sae_probe(path, lm, layer)
        else:
            missing.append(layer)
    if not missing:
        logger.info("SAE probes: all %d layers already fitted in %s", len(layers), directory)
        return probes

    start = time.perf_counter()
    activations = collect_text_activations(lm, texts, missing, config.lm_batch_size, config.max_text_tokens)
    n_tokens = next(iter(activations.values())).shape[0]
    logger.info("SAE probes: %d text tokens from %d texts in %.1f s", n_tokens, len(texts), time.perf_counter() - start)
    for layer in progress(missing, "fit SAE probes", "layer"):
        layer_start = time.perf_counter()
        metadata = {
            "model_name": lm.lm_id, "hook_name": hook_name(layer), "hook_layer": layer,
            "context_size": config.max_text_tokens, "fitted_by": "mmalign", "n_fit_tokens": n_tokens,
        }
        sae = fit_sae(activations.pop(layer), config, seed + layer, metadata)
        path = directory / f"layer_{layer:02d}"
        _save_atomically(sae, path)
        probes[layer] = load_sae_probe(path, lm, layer)
        logger.info("SAE probe for layer %d fitted in %.1f s", layer, time.perf_counter() - layer_start)
    return dict(sorted(probes.items()))
