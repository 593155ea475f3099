"""SAE probes on the LM's residual stream: fitted with sae-lens's SAE classes, saved in its format.

A probe for layer L reads the output of decoder block L (`blocks.L.hook_resid_post` in
sae-lens and TransformerLens naming). Its `cfg.json` metadata records the LM id and hook,
and applying it to another LM or layer raises `ProbeMismatchError`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import (
    SAE,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
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


HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre)$")


def hook_to_layer(name: str) -> int:
    """Translate a sae-lens / TransformerLens hook name to the decoder block whose output it reads.

    `blocks.L.hook_resid_post` is the output of block L; `blocks.L.hook_resid_pre` is the
    input of block L, which is the output of block L - 1.

    Raises:
        ProbeMismatchError: for other hooks (attention, MLP, resid_mid), which mmalign does not capture.
    """
    match = HOOK_PATTERN.match(name or "")
    if not match:
        raise ProbeMismatchError(
            f"SAE hook {name!r} is not a residual-stream hook; mmalign captures blocks.L.hook_resid_post "
            "and blocks.L.hook_resid_pre (L >= 1)"
        )
    layer, kind = int(match.group(1)), match.group(2)
    if kind == "resid_post":
        return layer
    if layer == 0:
        raise ProbeMismatchError("blocks.0.hook_resid_pre reads the embeddings, which mmalign does not probe; use a later layer")
    return layer - 1


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


def fit_sae(activations: torch.Tensor, config: ProbesConfig, seed: int, metadata: dict[str, object]):
    """Fit an SAE (sae-lens `standard` ReLU + L1, `topk` or `jumprelu`) on `[M, D]` activations.

    For `jumprelu`, `l1_coefficient` is used as sae-lens's L0 coefficient.

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
    common = {"d_in": d_in, "d_sae": config.d_sae, "metadata": SAEMetadata(**metadata)}
    if config.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=config.k, **common))
    elif config.architecture == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=config.l1_coefficient, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=config.l1_coefficient, **common))
    coefficients = {
        name: getattr(value, "value", value) for name, value in sae.get_coefficients().items()
    }
    with torch.no_grad():
        sae.b_dec.copy_(scaled.mean(dim=0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(config.steps):
        rows = torch.randint(0, scaled.shape[0], (config.batch_tokens,), generator=generator)
        output = sae.training_forward_pass(
            TrainStepInput(
                sae_in=scaled[rows], coefficients=coefficients,
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


def check_sae_probe(sae: SAE, source: str, lm: LanguageModel, layer: int, model_name: str | None = None) -> SAE:
    """Check that an SAE reads the residual stream of `lm` at `layer`.

    Raises:
        ProbeMismatchError: naming the recorded and the requested LM, hook or width.
    """
    expected_model = model_name or lm.lm_id
    recorded_model = sae.cfg.metadata.get("model_name")
    recorded_hook = sae.cfg.metadata.get("hook_name")
    if recorded_model != expected_model:
        raise ProbeMismatchError(
            f"SAE probe {source} was fitted on model {recorded_model!r}, not {expected_model!r}; refit it for this LM, "
            "or set probes.model_name if the models share a residual stream (e.g. base-model SAEs on the -it model)"
        )
    if hook_to_layer(recorded_hook) != layer:
        raise ProbeMismatchError(f"SAE probe {source} reads {recorded_hook!r}, which is not the output of layer {layer}")
    if sae.cfg.d_in != lm.d_model:
        raise ProbeMismatchError(f"SAE probe {source} has d_in {sae.cfg.d_in}, but {lm.lm_id} has d_model {lm.d_model}")
    sae.eval()
    return sae


def load_sae_probe(directory: Path, lm: LanguageModel, layer: int, model_name: str | None = None) -> SAE:
    """Open an SAE in sae-lens's on-disk format and check it was made for this LM and layer.

    Raises:
        FileNotFoundError: when the directory has no `cfg.json`.
        ProbeMismatchError: when the recorded LM, hook or width differs from the request.
    """
    if not (Path(directory) / "cfg.json").is_file():
        raise FileNotFoundError(f"no SAE probe at {directory} (cfg.json missing)")
    return check_sae_probe(SAE.load_from_disk(directory), str(directory), lm, layer, model_name)


def load_pretrained_probes(source: str, lm: LanguageModel, layers: list[int], model_name: str | None = None) -> dict[int, SAE]:
    """Load one SAE per layer from `disk:PATTERN` or `sae_lens:RELEASE:SAE_ID_PATTERN` ({layer} substituted).

    Raises:
        ValueError: for an unknown source form.
        FileNotFoundError: when a release cannot be downloaded or a path is missing.
        ProbeMismatchError: when an SAE does not fit the LM or layer.
    """
    kind, _, pattern = source.partition(":")
    if "{layer}" not in pattern:
        raise ValueError(f"probes.source {source!r} must contain {{layer}} so each layer gets its own SAE")
    probes = {}
    for layer in layers:
        target = pattern.replace("{layer}", str(layer))
        if kind == "disk":
            probes[layer] = load_sae_probe(Path(target), lm, layer, model_name)
        elif kind == "sae_lens":
            release, _, sae_id = target.partition(":")
            try:
                sae = SAE.from_pretrained(release, sae_id)
            except (OSError, ValueError, KeyError) as error:
                raise FileNotFoundError(
                    f"could not load sae-lens release {release!r}, SAE {sae_id!r} ({error}); "
                    "check the names in sae-lens's pretrained_saes.yaml, or download it and use disk:PATH"
                ) from None
            probes[layer] = check_sae_probe(sae, f"{release}:{sae_id}", lm, layer, model_name)
        else:
            raise ValueError(f"unknown probes.source form {kind!r}; accepted: fit, disk:PATTERN, sae_lens:RELEASE:SAE_ID")
    return probes


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
