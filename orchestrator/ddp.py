"""A PyTorch DDP engine for the trials DeepSpeed ZeRO cannot run (GaLore), or that ask for it.

It offers the worker the calls it makes of a DeepSpeed engine, with DeepSpeed's meaning, so
that the loop, its restarts, checkpoints, resume and reports are one code path for both:
``engine(**batch)``; ``backward(loss)``, the loss divided by the accumulation steps and the
gradients all-reduced only at the boundary (``no_sync`` before it); ``step()``, which at the
boundary clips, steps the optimizer and the LR schedule and frees the gradients;
``get_lr()``; ``save_checkpoint``/``load_checkpoint`` of a folder and a tag; ``destroy()``.

Under DDP every rank holds the same weights and optimizer state, so rank 0 alone writes a
checkpoint: the module's state dict, the optimizer's (GaLore's projectors as tensors:
``relora.galore.optimizer_state``), the schedule's and the caller's state, each a
``torch.save`` file that every rank reads back with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from relora.galore import load_optimizer_state, optimizer_state

FILES = {"model": "model.pt", "optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "client": "client_state.pt"}


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
        torch.save(self.module.state_dict(), target / FILES["model"])
        torch.save(optimizer_state(self.optimizer), target / FILES["optimizer"])
        torch.save(self.lr_scheduler.state_dict(), target / FILES["scheduler"])
        torch.save({**client_state, "micro_steps": self.micro_steps}, target / FILES["client"])

    def load_checkpoint(self, folder: str, tag: str) -> dict:
        """Every rank loads ``folder/tag`` (as DeepSpeed's engine does), tensors onto its device."""
        source = Path(folder) / tag

        def read(name: str):
            return torch.load(source / FILES[name], map_location=self.device, weights_only=True)

        self.module.load_state_dict(read("model"))
        load_optimizer_state(self.optimizer, read("optimizer"))
        self.lr_scheduler.load_state_dict(read("scheduler"))
        client = read("client")
        self.micro_steps = client.pop("micro_steps")
        return client

    def destroy(self) -> None:
        """Drop DDP's reducer (and its hooks on the parameters) before the model is re-wrapped."""
        self.ddp = None
        gc.collect()
