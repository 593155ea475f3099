"""Adapter kinds by name, and building an adapter from its config or its saved shape."""

from __future__ import annotations

from typing import Any

from mmalign.adapters.base import Adapter
from mmalign.adapters.linear import LinearAdapter, LinearPrefixAdapter
from mmalign.adapters.mlp import MLPAdapter

ADAPTER_KINDS: dict[str, type[Adapter]] = {
    LinearAdapter.kind: LinearAdapter,
    LinearPrefixAdapter.kind: LinearPrefixAdapter,
    MLPAdapter.kind: MLPAdapter,
}

_BASE_KEYS = ("pooled_grid", "keep_cls", "has_cls_token", "n_encoder_tokens", "dropout")


def build_adapter(shape: dict[str, Any]) -> Adapter:
    """Build an untrained adapter from a shape mapping (as written by `Adapter.shape_config`).

    Raises:
        ValueError: for an unknown kind, listing the accepted kinds.
    """
    kind = shape.get("kind")
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; accepted kinds: {', '.join(ADAPTER_KINDS)}")
    options = {key: shape[key] for key in _BASE_KEYS if key in shape}
    if kind == LinearPrefixAdapter.kind:
        options["prefix_tokens"] = shape["prefix_tokens"]
    if kind == MLPAdapter.kind:
        options["hidden_dim"] = shape.get("hidden_dim")
    return ADAPTER_KINDS[kind](shape["d_vision"], shape["d_lm"], **options)
