"""SAE probes: hook-name translation, fitting each architecture, and checks on loading."""

import pytest
import torch
from sae_lens import SAE

from mmalign.config import ProbesConfig
from mmalign.probes.sae import (
    ProbeMismatchError,
    _save_atomically,
    fit_sae,
    hook_name,
    hook_to_layer,
    load_pretrained_probes,
    load_sae_probe,
)


@pytest.mark.parametrize(("name", "layer"), [("blocks.3.hook_resid_post", 3), ("blocks.4.hook_resid_pre", 3), ("blocks.29.hook_resid_post", 29)])
def test_hook_to_layer(name, layer):
    assert hook_to_layer(name) == layer


@pytest.mark.parametrize("name", ["blocks.3.attn.hook_z", "blocks.3.hook_resid_mid", "blocks.0.hook_resid_pre", "", "resid_post"])
def test_hook_to_layer_rejects(name):
    with pytest.raises(ProbeMismatchError):
        hook_to_layer(name)


def _activations(d_model: int, n: int = 2048) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, d_model, generator=generator) * 3 + 10


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_fit_each_architecture_reconstructs(architecture):
    activations = _activations(32)
    config = ProbesConfig(d_sae=64, steps=60, batch_tokens=256, architecture=architecture, k=8)
    sae = fit_sae(activations, config, seed=0, metadata={"model_name": "m", "hook_name": hook_name(1)})
    with torch.no_grad():
        reconstruction = sae.decode(sae.encode(activations))
    centered = activations - activations.mean(dim=0)
    fvu = ((activations - reconstruction) ** 2).sum() / (centered**2).sum()
    assert fvu < 1.0
    if architecture == "topk":
        assert (sae.encode(activations) != 0).sum(dim=1).max() <= 8


def _saved_probe(tmp_path, lm, layer: int, model_name: str, d_in: int | None = None):
    d_in = d_in or lm.d_model
    config = ProbesConfig(d_sae=16, steps=2, batch_tokens=32)
    sae = fit_sae(_activations(d_in, 64), config, 0, {"model_name": model_name, "hook_name": hook_name(layer)})
    path = tmp_path / f"layer_{layer:02d}"
    _save_atomically(sae, path)
    return path


def test_load_checks_model_layer_and_width(smollm2, tmp_path):
    good = _saved_probe(tmp_path / "good", smollm2, 3, smollm2.lm_id)
    assert isinstance(load_sae_probe(good, smollm2, 3), SAE)
    with pytest.raises(ProbeMismatchError, match="not the output of layer 6"):
        load_sae_probe(good, smollm2, 6)
    other = _saved_probe(tmp_path / "other", smollm2, 3, "gemma-2-2b")
    with pytest.raises(ProbeMismatchError, match="'gemma-2-2b', not 'bundled:smollm2-135m'"):
        load_sae_probe(other, smollm2, 3)
    assert load_sae_probe(other, smollm2, 3, model_name="gemma-2-2b") is not None
    narrow = _saved_probe(tmp_path / "narrow", smollm2, 3, smollm2.lm_id, d_in=8)
    with pytest.raises(ProbeMismatchError, match="d_in 8"):
        load_sae_probe(narrow, smollm2, 3)


def test_load_pretrained_from_disk_pattern(smollm2, tmp_path):
    for layer in (3, 6):
        _saved_probe(tmp_path, smollm2, layer, smollm2.lm_id)
    probes = load_pretrained_probes(f"disk:{tmp_path}/layer_0{{layer}}", smollm2, [3, 6])
    assert sorted(probes) == [3, 6]


def test_load_pretrained_bad_sources(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="must contain"):
        load_pretrained_probes("disk:/x/layer_3", smollm2, [3])
    with pytest.raises(ValueError, match="unknown probes.source form"):
        load_pretrained_probes("s3:bucket/{layer}", smollm2, [3])
    with pytest.raises(FileNotFoundError, match="could not load sae-lens release"):
        load_pretrained_probes("sae_lens:no-such-release:layer_{layer}", smollm2, [3])
