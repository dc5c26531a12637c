"""The rank of an update, the paper's measure of how much a run escaped low rank."""

from __future__ import annotations

import torch
from torch import nn

from relora.layers import relora_layers


def update_rank(delta: torch.Tensor, *, threshold: float = 0.1) -> int:
    """The number of singular values of the 2-D matrix ``delta`` above ``threshold``."""
    if delta.ndim != 2:
        raise ValueError(f"delta must be a 2-D matrix, got shape {tuple(delta.shape)}")
    if threshold < 0:
        raise ValueError(f"threshold must be non-negative, got {threshold!r}")
    return int((torch.linalg.svdvals(delta.detach().float()) > threshold).sum())


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A float32 copy of each wrapped layer's ``W + s * B @ A``, by layer name.

    Take one when training starts (or when the layers are wrapped) and pass it to
    ``update_ranks`` later.
    """
    return {name: layer.base_weight() + layer.delta_weight() for name, layer in relora_layers(model)}


def update_ranks(model: nn.Module, start: dict[str, torch.Tensor], *, threshold: float = 0.1) -> dict[str, int]:
    """``update_rank(W_now - W_start)`` for every wrapped layer named in ``start``."""
    now = effective_weights(model)
    missing = set(start) - set(now)
    if missing:
        raise ValueError(f"start: layers {sorted(missing)} are not wrapped in this model")
    return {name: update_rank(now[name] - start[name].to(now[name].device), threshold=threshold) for name in start}
