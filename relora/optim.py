"""Partial optimizer reset: prune a fraction of the adapters' Adam moments at each restart.

After a merge the adapters start afresh, but their Adam moments still point along the
old update. ReLoRA prunes most of them (the paper uses 99%, by magnitude), and leaves
the state of every other parameter alone.

Pruning is per tensor: each adapter tensor loses ``ratio`` of its own moment entries,
those of smallest ``|exp_avg|`` (or a uniform random set), as the reference code and the
paper do. Under DeepSpeed ZeRO the moments do not live per parameter but in one flat fp32
partition per parameter group on each rank, and a tensor may span two ranks' partitions.
We keep the adapters in a parameter group of their own (``param_groups``); at a restart
each rank gathers that group's ``exp_avg`` (the adapters are a few percent of the model,
and this happens only at restarts), finds every tensor's entries by its offset in the
flat buffer, chooses the same per-tensor mask as every other rank, and applies its own
slice. The pruned entries are therefore the same with 1, 2 or 8 workers. This module
never imports DeepSpeed: it recognises a ZeRO optimizer by the attributes that hold its
groups and partitions.

Where our defaults come from (the reference code is Guitaricet/relora, torchrun_main.py):
- per-tensor pruning by ``|exp_avg|``: the paper's "magnitude pruning" and the reference
  code's, which prunes each adapter tensor on its own;
- one mask for both moments (``_pruned_mask``): ours. The reference code prunes each
  moment by its own magnitude, which left old momentum over a fresh tiny second moment and
  spiked the loss (README, "One deliberate difference"); the paper does not say;
- adapters exempt from weight decay (``param_groups``): ours, as for biases and norms: a
  decayed adapter pulls the update it carries towards zero before the merge keeps it. The
  reference code builds ``Adam(trainable_params, weight_decay=...)``, adapters included;
  the paper does not say;
- the merge just before the optimizer step whose LR is zero (``ReLoRAConfig.restarts_at``
  and the jagged schedule), so the fresh adapters and pruned moments start the re-warm.
  The reference code merges one step later (``update_step % relora == 1``), after the
  zero-LR step was taken with the old adapters; the paper says only that the LR re-warms
  after each reset.
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


def _pruned_mask(values: torch.Tensor, ratio: float, method: str, generator: torch.Generator | None) -> torch.Tensor:
    """The ``round(ratio * n)`` entries of one tensor's moments to zero: smallest ``|exp_avg|``
    (ties broken by index) or a uniform random set. Deterministic: every rank computes the same."""
    n = values.numel()
    k = round(ratio * n)
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        mask[:] = True
    elif k > 0 and method == "magnitude":
        mask[values.abs().topk(k, largest=False, sorted=False).indices] = True
    elif k > 0:
        usable = generator is not None and generator.device.type == values.device.type  # offloaded states: CPU
        mask[torch.randperm(n, generator=generator if usable else None, device=values.device)[:k]] = True
    return mask


def _prune_(state: dict, ratio: float, method: str, generator: torch.Generator | None) -> None:
    """Zero the same ``ratio`` of entries in every moment of one parameter's state.

    One mask for both moments, chosen by ``|exp_avg|`` (or at random). Pruning each moment
    by its own magnitude, as the reference code does, leaves entries whose ``exp_avg``
    survives while ``exp_avg_sq`` is zeroed; Adam then divides an old momentum by a fresh
    tiny second moment and takes a huge step. On a tiny LLaMA that made a 0.99 reset
    raise the loss from 2.15 to 3.15, where a full reset did not raise it at all.
    """
    moments = [state[key].view(-1) for key in MOMENT_KEYS if key in state]
    if moments:
        mask = _pruned_mask(moments[0], ratio, method, generator)
        for moment in moments:
            moment[mask] = 0


def _gather(flat: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Every rank's equal-sized partition, in rank order, and this rank's index."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group=group) == 1:
        return flat, 0
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, flat.contiguous(), group=group)
    return torch.cat(parts), dist.get_rank(group=group)


def _flat_moments(optimizer, flat: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    """The inner optimizer's state of one flat ZeRO partition, and its moments as 1-D views."""
    state = optimizer.optimizer.state.get(flat, {})
    return state, [state[key].view(-1) for key in MOMENT_KEYS if key in state]


def _prune_zero12_(optimizer, index: int, ratio: float, method: str, generator) -> dict:
    """Per-tensor pruning of one ZeRO-1/2 group, whose flat buffer is split evenly across ranks."""
    state, moments = _flat_moments(optimizer, optimizer.single_partition_of_fp32_groups[index])
    if not moments:
        return state
    full, rank = _gather(moments[0], optimizer.real_dp_process_group[index])
    mask = torch.zeros_like(full, dtype=torch.bool)
    for param, offset in zip(
        optimizer.round_robin_bit16_groups[index], optimizer.round_robin_bit16_offsets[index], strict=True
    ):
        end = offset + param.numel()
        mask[offset:end] = _pruned_mask(full[offset:end], ratio, method, generator)
    size = moments[0].numel()
    local = mask[rank * size : (rank + 1) * size]
    for moment in moments:
        moment[local] = 0
    return state


def _prune_zero3_(optimizer, index: int, ratio: float, method: str, generator) -> dict:
    """Per-tensor pruning of one ZeRO-3 sub-group: each rank holds an equal slice of every tensor."""
    state, moments = _flat_moments(optimizer, optimizer.fp32_partitioned_groups_flat[index])
    if not moments:
        return state
    full, rank = _gather(moments[0], optimizer.dp_process_group)
    world, size = full.numel() // moments[0].numel(), moments[0].numel()
    local = torch.zeros_like(moments[0], dtype=torch.bool)
    offset = 0
    for param in optimizer.fp16_groups[index]:
        part = param.ds_tensor.ds_numel  # this tensor's slice on every rank (padded)
        slices = [full[r * size + offset : r * size + offset + part] for r in range(world)]
        mask = torch.zeros(world * part, dtype=torch.bool, device=full.device)
        mask[: param.ds_numel] = _pruned_mask(torch.cat(slices)[: param.ds_numel], ratio, method, generator)
        local[offset : offset + part] = mask[rank * part : (rank + 1) * part]
        offset += part
    for moment in moments:
        moment[local] = 0
    return state


def _prune_zero_(optimizer, params: set[int], ratio: float, method: str, generator) -> list[dict]:
    """Prune, per tensor, the ZeRO flat partitions that hold exactly ``params``; their states."""
    stage12 = hasattr(optimizer, "single_partition_of_fp32_groups")
    groups = optimizer.round_robin_bit16_groups if stage12 else optimizer.fp16_groups  # stage 3: sub-groups
    states = []
    covered: set[int] = set()
    for index, group_params in enumerate(groups):
        ids = {id(p) for p in group_params}
        if not ids & params:
            continue
        if not ids <= params:
            raise ValueError(
                "params: under ZeRO they must fill whole parameter groups; "
                "put the adapters in a group of their own (relora.param_groups)"
            )
        covered |= ids
        prune = _prune_zero12_ if stage12 else _prune_zero3_
        states.append(prune(optimizer, index, ratio, method, generator))
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
    ZeRO 1/2/3 optimizers, per tensor either way (module docstring); under ZeRO every rank
    must call it, with a ``generator`` seeded alike for ``"random"``. Returns the fraction
    of the pruned moment entries that are zero afterwards (local to this rank under ZeRO).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    if method not in RESET_METHODS:
        raise ValueError(f"method must be one of {RESET_METHODS}, got {method!r}")
    param_ids = {id(p) for p in params}
    if _is_zero_optimizer(optimizer):
        states = _prune_zero_(optimizer, param_ids, ratio, method, generator)
    else:
        states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"] if id(p) in param_ids]
        for state in states:
            _prune_(state, ratio, method, generator)
    zeros = total = 0
    for state in states:
        for moment in (state[key] for key in MOMENT_KEYS if key in state):
            zeros += int((moment == 0).sum())
            total += moment.numel()
    return zeros / total if total else 0.0
