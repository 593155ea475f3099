"""The MLP adapter: Linear, GELU, Linear on every visual token (the LLaVA-1.5 projector)."""

from __future__ import annotations

import torch
from torch import nn

from mmalign.adapters.base import Adapter


class MLPAdapter(Adapter):
    """Two layers with GELU: `Linear(d_vision, hidden) -> GELU -> Linear(hidden, d_lm)`; hidden defaults to d_lm."""

    kind = "mlp"

    def __init__(self, d_vision: int, d_lm: int, *, hidden_dim: int | None = None, **options) -> None:
        super().__init__(d_vision, d_lm, **options)
        self.hidden_dim = hidden_dim or d_lm
        self.net = nn.Sequential(nn.Linear(d_vision, self.hidden_dim), nn.GELU(), nn.Linear(self.hidden_dim, d_lm))

    def project(self, selected: torch.Tensor) -> torch.Tensor:
        return self.net(selected)

    def extra_config(self) -> dict[str, object]:
        return {"hidden_dim": self.hidden_dim}
