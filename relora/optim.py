"""Partial optimizer reset: prune a fraction of the adapters' Adam moments at each restart.

After a merge the adapters start afresh, but their Adam moments still point along the
old update. ReLoRA prunes most of them (the paper uses 99%, by magnitude), and leaves
the state of every other parameter alone.

Under DeepSpeed ZeRO the moments do not live per parameter but in one flat fp32
partition per parameter group on each rank. We therefore keep the adapters in a
parameter group of their own (``param_groups``) and prune that group's partition as a
whole; each rank prunes its own slice, by its own magnitude threshold. This module
never imports DeepSpeed: it recognises a ZeRO optimizer by the attributes that hold
its groups and partitions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from relora.layers import adapter_parameters

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
RESET_METHODS = ("magnitude", "random")


def param_groups(model: nn.Module, *, weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters split in two groups, the adapters last.

    Biases and norm weights (1-D tensors) and the adapters get no weight decay;
    the separate adapter group is what lets ``reset_optimizer_state`` find the
    adapters' moments inside a ZeRO flat partition.
    """
    adapters = adapter_parameters(model)
    adapter_ids = {id(p) for p in adapters}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    decayed = [p for p in rest if p.ndim >= 2]
    undecayed = [p for p in rest if p.ndim < 2]
    groups = [
        {"name": "decay", "params": decayed, "weight_decay": weight_decay},
        {"name": "no_decay", "params": undecayed, "weight_decay": 0.0},
        {"name": "adapters", "params": adapters, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _prune_(state: dict, ratio: float, method: str, generator: torch.Generator | None) -> None:
    """Zero the same ``ratio`` of entries in every moment of one state.

    One mask for both moments, chosen by ``|exp_avg|`` (or at random). Pruning each moment
    by its own magnitude, as the reference code does, leaves entries whose ``exp_avg``
    survives while ``exp_avg_sq`` is zeroed; Adam then divides an old momentum by a fresh
    tiny second moment and takes a huge step. On a tiny LLaMA that made a 0.99 reset
    raise the loss from 2.15 to 3.15, where a full reset did not raise it at all.
    """
    moments = [state[key].view(-1) for key in MOMENT_KEYS if key in state]
    if not moments:
        return
    n = moments[0].numel()
    k = round(ratio * n)
    if k == 0:
        return
    if k >= n:
        index = slice(None)
    elif method == "magnitude":
        # The k entries of smallest momentum magnitude (ties broken by index).
        index = moments[0].abs().topk(k, largest=False, sorted=False).indices
    else:
        device = moments[0].device
        usable = generator is not None and generator.device.type == device.type  # offloaded states live on CPU
        index = torch.randperm(n, generator=generator if usable else None, device=device)[:k]
    for moment in moments:
        moment[index] = 0


def _zero_flat_states(optimizer, params: set[int]) -> list[dict]:
    """The inner-optimizer states of the ZeRO flat partitions that hold exactly ``params``."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO stage 1 and 2
        pairs = zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups, strict=True)
    else:  # ZeRO stage 3: each param group is split into sub-groups, each with its own partition
        pairs = zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat, strict=True)
    states = []
    covered: set[int] = set()
    for group_params, flat in pairs:
        ids = {id(p) for p in group_params}
        if not ids & params:
            continue
        if not ids <= params:
            raise ValueError(
                "params: under ZeRO they must fill whole parameter groups; "
                "put the adapters in a group of their own (relora.param_groups)"
            )
        covered |= ids
        states.append(optimizer.optimizer.state.get(flat, {}))
    if covered != params:
        raise ValueError("params: some are not held by this ZeRO optimizer")
    return states


def _is_zero_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_partitioned_groups_flat")


@torch.no_grad()
def reset_optimizer_state(
    optimizer,
    params: Iterable[nn.Parameter],
    *,
    ratio: float,
    method: str = "magnitude",
    generator: torch.Generator | None = None,
) -> float:
    """Zero ``ratio`` of the entries of the Adam moments (``exp_avg``, ``exp_avg_sq``) of ``params``.

    ``method="magnitude"`` zeroes the entries of smallest momentum ``|exp_avg|``,
    ``"random"`` a uniform random subset; both moments are zeroed at the same entries.
    ``ratio=1.0`` is a full reset. The step counts and the state of every other
    parameter are left as they are. Works on ``torch.optim`` optimizers and on DeepSpeed
    ZeRO 1/2/3 optimizers (see the module docstring). Returns the fraction of the pruned
    moment entries that are zero afterwards (local to this rank under ZeRO).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    if method not in RESET_METHODS:
        raise ValueError(f"method must be one of {RESET_METHODS}, got {method!r}")
    param_ids = {id(p) for p in params}
    if _is_zero_optimizer(optimizer):
        states = _zero_flat_states(optimizer, param_ids)
    else:
        states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"] if id(p) in param_ids]
    zeros = total = 0
    for state in states:
        _prune_(state, ratio, method, generator)
        for moment in (state[key] for key in MOMENT_KEYS if key in state):
            zeros += int((moment == 0).sum())
            total += moment.numel()
    return zeros / total if total else 0.0
