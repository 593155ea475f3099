"""A small linear adapter into SmolLM2-135M and random encoder tokens for it, shared by treatment tests."""

from __future__ import annotations

import torch

from mmalign.adapters.registry import build_adapter

D_VISION = 32
N_ENCODER_TOKENS = 17  # CLS + a 4 x 4 patch grid


def small_adapter(seed: int = 0):
    """Build a seeded linear adapter from `D_VISION`-wide tokens to SmolLM2's 576-wide embeddings."""
    torch.manual_seed(seed)
    return build_adapter({
        "kind": "linear", "d_vision": D_VISION, "d_lm": 576, "pooled_grid": 2, "keep_cls": True,
        "has_cls_token": True, "n_encoder_tokens": N_ENCODER_TOKENS,
    })


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """Return seeded encoder outputs for `n` images, `[n, N_ENCODER_TOKENS, D_VISION]`."""
    return torch.randn(n, N_ENCODER_TOKENS, D_VISION, generator=torch.Generator().manual_seed(seed))
