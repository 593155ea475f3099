"""Linear adapters: one Linear per visual token (LLaVA form) or a pooled vector to k tokens (LiMBeR form)."""

from __future__ import annotations

import torch
from torch import nn

from mmalign.adapters.base import Adapter, select_vision_tokens


class LinearAdapter(Adapter):
    """One `Linear(d_vision, d_lm)` applied to every selected vision-encoder token."""

    kind = "linear"

    def __init__(self, d_vision: int, d_lm: int, **options) -> None:
        super().__init__(d_vision, d_lm, **options)
        self.proj = nn.Linear(d_vision, d_lm)

    def project(self, selected: torch.Tensor) -> torch.Tensor:
        return self.proj(selected)  # [B, V, d_lm]


class LinearPrefixAdapter(Adapter):
    """One pooled vector mapped by `Linear(d_vision, k * d_lm)` to k visual tokens.

    The pooled vector is the mean of the selected tokens (CLS included when kept).
    """

    kind = "linear-prefix"

    def __init__(self, d_vision: int, d_lm: int, *, prefix_tokens: int, **options) -> None:
        super().__init__(d_vision, d_lm, **options)
        if prefix_tokens < 1:
            raise ValueError(f"adapter.prefix_tokens must be at least 1, got {prefix_tokens}")
        self.prefix_tokens = prefix_tokens
        self.proj = nn.Linear(d_vision, prefix_tokens * d_lm)

    @property
    def n_visual_tokens(self) -> int:
        return self.prefix_tokens

    def project(self, selected: torch.Tensor) -> torch.Tensor:
        pooled = selected.mean(dim=1)  # [B, d_vision]
        return self.proj(pooled).view(selected.shape[0], self.prefix_tokens, self.d_lm)

    def extra_config(self) -> dict[str, object]:
        return {"prefix_tokens": self.prefix_tokens}


__all__ = ["LinearAdapter", "LinearPrefixAdapter", "select_vision_tokens"]
