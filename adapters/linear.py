"""The linear adapter: vision-encoder tokens to visual tokens in the LM's embedding space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def select_vision_tokens(
    vision_tokens: torch.Tensor, has_cls_token: bool, keep_cls: bool, pooled_grid: int
) -> torch.Tensor:
    """Pool the patch grid to `pooled_grid` x `pooled_grid` and optionally keep CLS in front.

    Args:
        vision_tokens: `[B, T, D]` encoder outputs, CLS first when `has_cls_token`.

    Returns:
        `[B, keep_cls + pooled_grid**2, D]`.

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
    batch, _, dim = patches.shape
    grid = patches.transpose(1, 2).reshape(batch, dim, side, side)  # [B, D, H, W]
    if pooled_grid != side:
        grid = F.adaptive_avg_pool2d(grid, pooled_grid)
    pooled = grid.flatten(2).transpose(1, 2)  # [B, G*G, D]
    if keep_cls:
        pooled = torch.cat([vision_tokens[:, :1], pooled], dim=1)
    return pooled


class LinearAdapter(nn.Module):
    """One `Linear(d_vision, d_lm)` applied to every selected vision-encoder token."""

    kind = "linear"

    def __init__(self, d_vision: int, d_lm: int, pooled_grid: int, keep_cls: bool, has_cls_token: bool) -> None:
        super().__init__()
        self.d_vision = d_vision
        self.d_lm = d_lm
        self.pooled_grid = pooled_grid
        self.keep_cls = keep_cls
        self.has_cls_token = has_cls_token
        self.proj = nn.Linear(d_vision, d_lm)

    @property
    def n_visual_tokens(self) -> int:
        return int(self.keep_cls) + self.pooled_grid**2

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Map `[B, T, d_vision]` encoder tokens to `[B, n_visual_tokens, d_lm]` visual tokens."""
        if vision_tokens.shape[-1] != self.d_vision:
            raise ValueError(
                f"vision tokens have dimension {vision_tokens.shape[-1]} but the adapter expects {self.d_vision}; "
                "the checkpoint was trained for another vision encoder"
            )
        selected = select_vision_tokens(vision_tokens, self.has_cls_token, self.keep_cls, self.pooled_grid)
        return self.proj(selected)

    def shape_config(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "d_vision": self.d_vision,
            "d_lm": self.d_lm,
            "pooled_grid": self.pooled_grid,
            "keep_cls": self.keep_cls,
            "has_cls_token": self.has_cls_token,
            "n_visual_tokens": self.n_visual_tokens,
        }
