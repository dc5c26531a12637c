"""Every collective the orchestrator and the benchmarks run, on the device the backend serves.

On GPUs Ray Train's process group is NCCL alone, and NCCL serves CUDA tensors only: an
all-reduce of a CPU tensor raises "No backend type associated with device type cpu". CI runs
gloo, which serves CPU and CUDA alike, so nothing there shows the mistake. Hence one rule,
kept in this file: a collective's tensors live on the worker's device (the one DeepSpeed's
own collectives use), and results come back to the host in one read, when asked for.
`tests/orchestrator/test_collectives.py` checks that nothing else in `orchestrator/` or
`benchmarks/` calls torch.distributed's collectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist


def init_deepspeed_comm() -> None:
    """DeepSpeed's process group (NCCL on GPUs, gloo on CPUs), without its CPU shared-memory op.

    On CPUs DeepSpeed JIT-compiles `deepspeed_shm_comm` when it builds its backend: 35-50 s on a
    2-core machine before the first step, once per venv path and $HOME (torch's extension cache
    keys on both), so on every fresh node of a CPU cluster. The op serves only
    `inference_all_reduce` (tensor-parallel inference), never ZeRO training: switch it off.
    DeepSpeed keeps `deepspeed.ops.__compatible_ops__` as one dict so that edits persist.
    """
    import deepspeed
    import deepspeed.ops

    cuda = torch.cuda.is_available()
    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def check_served(device: torch.device, group=None) -> None:
    """Raise, naming the device and the backend, unless the group can run collectives on ``device``."""
    group = group or dist.group.WORLD
    served = {d.type for d in group._device_types}
    if device.type not in served:
        raise RuntimeError(
            f"the process group's backend ({dist.get_backend(group)}) serves {sorted(served)} tensors, "
            f"not {device.type}: collectives must run on the worker's device"
        )


def sum_across_ranks(values: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    """The element-wise sum over all ranks, as a float64 tensor on ``device``.

    No host sync: the caller reads the result (``.tolist()``) only when it needs the number.
    """
    check_served(device)
    if isinstance(values, torch.Tensor):
        total = values.detach().to(device=device, dtype=torch.float64).clone()
    else:
        total = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total


def gather_across_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``values`` (same shape on each), stacked in rank order on ``device``."""
    check_served(device)
    mine = values.detach().to(device).contiguous()
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return torch.stack(gathered)


def gather_objects(obj, device: torch.device) -> list:
    """Every rank's picklable ``obj``, in rank order.

    torch pickles through a tensor on the *current* CUDA device under NCCL, so that device is
    made the worker's for the call: else ranks sharing a node would all talk from GPU 0.
    """
    check_served(device)
    gathered: list = [None] * dist.get_world_size()
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        dist.all_gather_object(gathered, obj)
    return gathered


def barrier(device: torch.device) -> None:
    """Wait for every rank; under NCCL on ``device``, not on whichever GPU happens to be current."""
    check_served(device)
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
