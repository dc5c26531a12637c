"""What one rank holds for training: parameters, gradients and optimizer state, in bytes.

Counted from the tensors themselves (elements x element size, each storage once), so the
numbers are the same on CPUs and GPUs and compare methods exactly: ReLoRA's frozen weights
have no gradient and no moments, GaLore's moments are r x d, and ZeRO keeps 1/N of the
optimizer state (fp32 master copies included) on each rank. Activations and allocator slack
are not here: the device's own peak (``torch.cuda.max_memory_allocated``) holds them.

Take the breakdown between a step's backward and its optimizer step, after at least one
optimizer step: then the gradients exist and the optimizer has created its state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# DeepSpeed's ZeRO-1/2 optimizer: its fp32 master partitions and its reduced gradient partitions.
FP32_MASTERS = "single_partition_of_fp32_groups"
REDUCED_GRADIENTS = "averaged_gradients"


def memory_breakdown(model: nn.Module, optimizer) -> dict[str, int]:
    """``params_bytes`` (parameters and buffers), ``grads_bytes`` and ``optimizer_bytes`` of one rank.

    ``optimizer`` is a ``torch.optim`` optimizer or a DeepSpeed ZeRO optimizer (an engine's
    ``.optimizer``): its state, and under ZeRO its fp32 master partitions.
    """
    seen: set[int] = set()
    params = _bytes([*model.parameters(), *model.buffers()], seen)
    grads = _bytes((p.grad for p in model.parameters() if p.grad is not None), seen)
    reduced = getattr(optimizer, REDUCED_GRADIENTS, None)  # ZeRO-2 moves gradients out of .grad
    if isinstance(reduced, dict):
        grads += _bytes((t for tensors in reduced.values() for t in tensors or () if t is not None), seen)
    inner = getattr(optimizer, "optimizer", None)
    state = (inner if isinstance(inner, torch.optim.Optimizer) else optimizer).state
    masters = getattr(optimizer, FP32_MASTERS, None) or []
    optimizer_bytes = _bytes(_tensors_in(list(state.values())), seen) + _bytes(masters, seen)
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer_bytes}


def _bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not counted before (views share one)."""
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _tensors_in(value, depth: int = 0) -> Iterable[torch.Tensor]:
    """Every tensor inside an optimizer's state: dicts, lists, and objects such as GaLore's
    projector, which keeps its projection matrix as an attribute."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 4:
        return
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _tensors_in(vars(value), depth + 1)
