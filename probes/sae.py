"""SAE probes on the LM's residual stream: fitted with sae-lens's SAE classes, saved in its format.

A probe for layer L reads the output of decoder block L (`blocks.L.hook_resid_post` in
sae-lens and TransformerLens naming). Its `cfg.json` metadata records the LM id and hook,
and applying it to another LM or layer raises `ProbeMismatchError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE

from mmalign.capture import capture_resid_post
from mmalign.config import ProbesConfig
from mmalign.io import write_atomic
from mmalign.lm import LanguageModel
from mmalign.probes.corpus import TextSource
from mmalign.probes.sae_stream import (
    STATE_FILE,
    StreamingSaeFitter,
    _scaled_mean,
    input_scale,
    new_training_sae,
    sae_coefficients,
    sae_train_step,
    text_batch,
)
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
    """Run texts through the LM and return each layer's residual stream at every text token, all in memory.

    `fit_sae_probes` streams instead; this stays for fitting one tensor with `fit_sae` and
    for comparisons. Each text is run as `[start] text`; the start position (an attention
    sink with very large norm) and padding are left out.

    Returns:
        layer -> `[M, D]` activations of the M text tokens.
    """
    encoded = [lm.tokenizer(text, add_special_tokens=False).input_ids[:max_tokens] for text in texts]
    encoded = [ids for ids in encoded if ids]
    encoded.sort(key=len)  # batches of similar length waste less padding
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in progress(range(0, len(encoded), batch_size), "text activations", "batch"):
        batch, keep = text_batch(lm, encoded[start : start + batch_size])
        hidden = capture_resid_post(lm, batch, layers)
        for layer in layers:
            collected[layer].append(hidden[layer].float().cpu()[keep])
    return {layer: torch.cat(chunks) for layer, chunks in collected.items()}


def fit_sae(activations: torch.Tensor, config: ProbesConfig, seed: int, metadata: dict[str, object]):
    """Fit an SAE (sae-lens `standard` ReLU + L1, `topk` or `jumprelu`) on `[M, D]` activations in memory.

    For `jumprelu`, `l1_coefficient` is used as sae-lens's L0 coefficient.

    Inputs are scaled so the mean squared distance from their mean is D during fitting,
    so the L1 penalty weighs the same against reconstruction at every layer, whatever the
    size of the residual stream's constant component. The scale is folded into the
    weights afterwards, so the returned SAE reads raw activations. The streaming fitter
    takes the same steps when its buffer contains all of `activations`.
    """
    sae = new_training_sae(config, activations.shape[1], seed, metadata)
    coefficients = sae_coefficients(sae)
    scale = input_scale(activations)
    with torch.no_grad():
        sae.b_dec.copy_(_scaled_mean(activations, scale))
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(config.steps):
        rows = torch.randint(0, activations.shape[0], (config.batch_tokens,), generator=generator)
        sae_train_step(sae, optimizer, activations[rows] * scale, coefficients, step)
    sae.fold_activation_norm_scaling_factor(scale)
    return sae


def _save_atomically(sae: TrainingSAE, directory: Path) -> None:
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
    """Load one SAE per layer from `disk:PATTERN` or `sae_lens:RELEASE:SAE_ID_PATTERN`.

    `{layer}` in the pattern becomes the layer number and `{layer:02d}` the zero-padded
    one, as in the `layer_03` folders of probes fitted by mmalign.

    Raises:
        ValueError: for an unknown source form.
        FileNotFoundError: when a release cannot be downloaded or a path is missing.
        ProbeMismatchError: when an SAE does not fit the LM or layer.
    """
    kind, _, pattern = source.partition(":")
    if "{layer}" not in pattern and "{layer:02d}" not in pattern:
        raise ValueError(f"probes.source {source!r} must contain {{layer}} or {{layer:02d}} so each layer gets its own SAE")
    probes = {}
    for layer in layers:
        target = pattern.replace("{layer:02d}", f"{layer:02d}").replace("{layer}", str(layer))
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


FIT_SUMMARY = "fit_summary.json"


def fit_sae_probes(
    lm: LanguageModel, texts: Sequence[str] | Sequence[TextSource], layers: list[int], config: ProbesConfig, seed: int,
    directory: Path, on_step: Callable[[int], None] | None = None,
) -> dict[int, SAE]:
    """Fit (or reuse) one SAE probe per layer and save each under `directory/layer_LL/`.

    The missing layers are fitted together by `StreamingSaeFitter`, so one LM forward pass
    per text batch serves all of them and memory stays bounded by `probes.buffer_tokens`.
    Probes already on disk for this LM and layer are loaded, not refitted. An interrupted
    fit resumes from `directory/fit_state.pt`, which is deleted once every probe is saved.
    `directory/fit_summary.json` records the text sources, texts and tokens of the fit.

    Args:
        texts: Text sources (see `open_text_sources`), or a list of texts.
        on_step: Passed to `StreamingSaeFitter.fit`.
    """
    if texts and isinstance(texts[0], str):
        texts = [TextSource("texts", lambda texts=texts: iter(texts))]
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
    metadata = {
        layer: {"model_name": lm.lm_id, "hook_name": hook_name(layer), "hook_layer": layer,
                "context_size": config.max_text_tokens, "fitted_by": "mmalign"}
        for layer in missing
    }
    fitter = StreamingSaeFitter(lm, missing, config, seed, metadata)
    saes = fitter.fit(texts, directory / STATE_FILE, on_step)
    for layer, sae in saes.items():
        path = directory / f"layer_{layer:02d}"
        _save_atomically(sae, path)
        probes[layer] = load_sae_probe(path, lm, layer)
    summary = {"text_sources": [source.name for source in texts], "n_fit_texts": fitter.n_fit_texts_,
               "n_tokens_read": fitter.n_tokens_read_, "layers": missing, "steps": config.steps}
    write_atomic(directory / FIT_SUMMARY, json.dumps(summary, indent=2))
    (directory / STATE_FILE).unlink(missing_ok=True)
    logger.info("SAE probes: layers %s fitted in %.1f s on %d texts (%d tokens read)", missing,
                time.perf_counter() - start, fitter.n_fit_texts_, fitter.n_tokens_read_)
    return dict(sorted(probes.items()))
