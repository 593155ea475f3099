"""The adapter interface and the selection of vision-encoder tokens that feed it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def select_vision_tokens(
    vision_tokens: torch.Tensor, has_cls_token: bool, keep_cls: bool, pooled_grid: int | None
) -> torch.Tensor:
    """Pool the patch grid to `pooled_grid` x `pooled_grid` and optionally keep CLS in front.

    Args:
        vision_tokens: `[B, T, D]` encoder outputs, CLS first when `has_cls_token`.
        pooled_grid: Side of the pooled grid; None keeps the whole grid.

    Returns:
        `[B, keep_cls + G*G, D]` with G the pooled (or original) grid side.

    Raises:
        ValueError: when the patch tokens do not form a square grid, or CLS is requested
            from an encoder without one.
    """
    patches = vision_tokens[:, 1:] if has_cls_token else vision_tokens
    n_patches = patches.shape[1]
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patch tokens do not form a square grid; check the encoder's CLS/register layout")
    if keep_cls and not has_cls_token:
        raise ValueError("adapter.keep_cls is true but the vision encoder has no CLS token; set keep_cls: false")
    if pooled_grid is not None and pooled_grid != side:
        batch, _, dim = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, dim, side, side)  # [B, D, H, W]
        patches = F.adaptive_avg_pool2d(grid, pooled_grid).flatten(2).transpose(1, 2)  # [B, G*G, D]
    if keep_cls:
        patches = torch.cat([vision_tokens[:, :1], patches], dim=1)
    return patches


def grid_tokens(n_encoder_tokens: int, has_cls_token: bool, pooled_grid: int | None) -> int:
    """Return the number of patch tokens after pooling, for an encoder output of length T."""
    n_patches = n_encoder_tokens - int(has_cls_token)
    return pooled_grid**2 if pooled_grid is not None else n_patches


class Adapter(nn.Module):
    """Base class: maps `[B, T, d_vision]` encoder tokens to `[B, V, d_lm]` visual tokens.

    Subclasses set `kind` and implement `project`. Token selection (CLS, pooling) and
    dropout on the selected encoder tokens happen here, so every kind shares them.
    """

    kind = "base"

    def __init__(
        self, d_vision: int, d_lm: int, *, pooled_grid: int | None, keep_cls: bool, has_cls_token: bool,
        n_encoder_tokens: int, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_vision = d_vision
        self.d_lm = d_lm
        self.pooled_grid = pooled_grid
        self.keep_cls = keep_cls
        self.has_cls_token = has_cls_token
        self.n_encoder_tokens = n_encoder_tokens
        self.dropout = nn.Dropout(dropout)
        self.dropout_p = dropout

    @property
    def n_selected_tokens(self) -> int:
        return int(self.keep_cls) + grid_tokens(self.n_encoder_tokens, self.has_cls_token, self.pooled_grid)

    @property
    def n_visual_tokens(self) -> int:
        return self.n_selected_tokens

    def project(self, selected: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        if vision_tokens.shape[-1] != self.d_vision:
            raise ValueError(
                f"vision tokens have dimension {vision_tokens.shape[-1]} but the adapter expects {self.d_vision}; "
                "the checkpoint was trained for another vision encoder"
            )
        selected = select_vision_tokens(vision_tokens, self.has_cls_token, self.keep_cls, self.pooled_grid)
        return self.project(self.dropout(selected))

    def shape_config(self) -> dict[str, object]:
        """Return everything needed to rebuild this adapter, stored in `adapter_config.json`."""
        return {
            "kind": self.kind,
            "d_vision": self.d_vision,
            "d_lm": self.d_lm,
            "pooled_grid": self.pooled_grid,
            "keep_cls": self.keep_cls,
            "has_cls_token": self.has_cls_token,
            "n_encoder_tokens": self.n_encoder_tokens,
            "dropout": self.dropout_p,
            "n_visual_tokens": self.n_visual_tokens,
            **self.extra_config(),
        }

    def extra_config(self) -> dict[str, object]:
        return {}
