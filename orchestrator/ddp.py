"""A PyTorch DDP engine for the trials DeepSpeed ZeRO cannot run (GaLore), or that ask for it.

It offers the worker the calls it makes of a DeepSpeed engine, with DeepSpeed's meaning, so
that the loop, its restarts, checkpoints, resume and reports are one code path for both:
``engine(**batch)``; ``backward(loss)``, the loss divided by the accumulation steps and the
gradients all-reduced only at the boundary (``no_sync`` before it); ``step()``, which at the
boundary clips, steps the optimizer and the LR schedule and frees the gradients;
``get_lr()``; ``save_checkpoint``/``load_checkpoint`` of a folder and a tag; ``destroy()``.

Under DDP every rank holds the same weights and optimizer state, so rank 0 alone writes a
checkpoint, and never a pickle (README, "Bad input, and what must be trusted"): the module as
safetensors; the optimizer's state (GaLore's projectors as tensors:
``relora.galore.optimizer_state``), the schedule's and the caller's as one JSON file whose
tensors are in a second safetensors file. Every rank reads them back.
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from relora.galore import load_optimizer_state, optimizer_state

MODEL, STATE, STATE_TENSORS = "model.safetensors", "state.json", "state_tensors.safetensors"
TENSOR, ITEMS, TUPLE = "__tensor__", "__items__", "__tuple__"  # what JSON cannot say of itself


def split_tensors(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``value`` (nested dicts, lists, tuples, numbers, tensors) as JSON data, each tensor moved
    into ``tensors`` under its path and left as ``{TENSOR: path}``; dict keys keep their type."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, dict):
        return {ITEMS: [[key, split_tensors(item, tensors, f"{path}/{key}")] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [split_tensors(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    return value


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``split_tensors``."""
    if isinstance(value, dict):
        if TENSOR in value:
            return tensors[value[TENSOR]]
        if TUPLE in value:
            return tuple(join_tensors(item, tensors) for item in value[TUPLE])
        return {key: join_tensors(item, tensors) for key, item in value[ITEMS]}
    if isinstance(value, list):
        return [join_tensors(item, tensors) for item in value]
    return value


class DDPEngine:
    """``model`` under DistributedDataParallel with ``optimizer`` and ``lr_scheduler``, stepped
    every ``grad_accum_steps`` micro-batches."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        *,
        device: torch.device,
        grad_accum_steps: int,
        grad_clip: float,
        bf16: bool,
    ) -> None:
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.device = device
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip = grad_clip
        self.bf16 = bf16
        self.micro_steps = 0
        # Gradients as views of DDP's all-reduce buckets: one copy of them, not two.
        device_ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def is_boundary(self) -> bool:
        """Whether the current micro-batch is the last of an optimizer step."""
        return (self.micro_steps + 1) % self.grad_accum_steps == 0

    def __call__(self, **batch):
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            return self.ddp(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate; all-reduce the gradients only with the step's last micro-batch."""
        with contextlib.nullcontext() if self.is_boundary() else self.ddp.no_sync():
            (loss / self.grad_accum_steps).backward()

    def step(self) -> None:
        """At the boundary: clip, step the optimizer and the schedule, free the gradients."""
        boundary = self.is_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.grad_clip > 0:
            params = [p for p in self.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        """Rank 0 writes ``folder/tag``: the ranks' states are identical under DDP."""
        if dist.get_rank() != 0:
            return
        target = Path(folder) / tag
        target.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(target / MODEL))  # tied weights once
        state = {
            "optimizer": optimizer_state(self.optimizer),
            "scheduler": self.lr_scheduler.state_dict(),
            "client": {**client_state, "micro_steps": self.micro_steps},
        }
        tensors: dict[str, torch.Tensor] = {}
        (target / STATE).write_text(json.dumps(split_tensors(state, tensors)))
        save_file(tensors, target / STATE_TENSORS)

    def load_checkpoint(self, folder: str, tag: str) -> dict:
        """Every rank loads ``folder/tag`` (as DeepSpeed's engine does), tensors onto its device."""
        source = Path(folder) / tag
        load_model(self.module, str(source / MODEL), device=str(self.device))
        tensors = load_file(source / STATE_TENSORS, device=str(self.device))
        state = join_tensors(json.loads((source / STATE).read_text()), tensors)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        client = state["client"]
        self.micro_steps = client.pop("micro_steps")
        return client

    def destroy(self) -> None:
        """Drop DDP's reducer (and its hooks on the parameters) before the model is re-wrapped."""
        self.ddp = None
        gc.collect()
