"""One ReLoRA restart, the same for a plain PyTorch optimizer and a DeepSpeed ZeRO engine.

A restart is four steps, in this order:

1. merge ``s·B·A`` into each frozen ``W``;
2. re-draw ``A`` and zero ``B``, from a generator seeded alike on every data-parallel rank;
3. under DeepSpeed, overwrite the optimizer's fp32 master copies of the adapters with the
   new values. DeepSpeed trains its fp32 masters and copies them into the model after each
   step: without this, the next step silently writes the *old* adapters back, and the
   merged update is applied twice;
4. prune ``reset_ratio`` of the adapters' Adam moments (``reset_optimizer_state``).

`restart` does all four; `make_optimizer` builds the AdamW and jagged-cosine schedule that
go with it. Neither imports DeepSpeed unless a DeepSpeed engine or optimizer is passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from relora.layers import adapter_parameters, merge
from relora.optim import RESET_METHODS, param_groups, reset_optimizer_state
from relora.recipe import ReLoRAConfig
from relora.schedule import jagged_cosine_scheduler


@dataclass(frozen=True)
class RestartResult:
    merged_layers: int  # adapter layers merged into their base weights
    reset_fraction: float  # of the adapters' moment entries, zero afterwards (this rank's under ZeRO)
    synced_fp32_masters: bool  # whether DeepSpeed's fp32 master copies were overwritten
    lost_share: float  # of the update's norm, what the stored base weights lost (rounding): ~0 when exact


def _is_deepspeed(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "deepspeed"


def optimizer_of(optimizer_or_engine):
    """The optimizer that holds the moments: a DeepSpeed engine's, or the one given."""
    if _is_deepspeed(optimizer_or_engine) and hasattr(optimizer_or_engine, "module"):
        return optimizer_or_engine.optimizer
    return optimizer_or_engine


@torch.no_grad()
def restart(
    model: nn.Module,
    optimizer,
    *,
    reset_ratio: float,
    reset_method: str = "magnitude",
    generator: torch.Generator | None = None,
    compensate: bool = True,
) -> RestartResult:
    """Merge, re-initialise, sync DeepSpeed's fp32 masters, and prune the adapters' moments.

    ``optimizer`` is a ``torch.optim`` optimizer, a DeepSpeed engine, or a DeepSpeed
    (ZeRO 1/2 or bf16) optimizer; ZeRO-3 is untested. ``generator`` must be seeded alike on
    every rank in data-parallel runs, so that every rank draws the same new ``A``; a
    ``"random"`` reset draws from it too. Bad arguments are refused before any weight changes.
    Merges into bf16 weights keep what rounding drops (``relora.layers``); ``compensate=False``
    rounds them plainly, as the reference code does (for comparison only).
    """
    if not 0.0 <= reset_ratio <= 1.0:
        raise ValueError(f"reset_ratio must lie in [0, 1], got {reset_ratio!r}")
    if reset_method not in RESET_METHODS:
        raise ValueError(f"reset_method must be one of {RESET_METHODS}, got {reset_method!r}")
    optimizer = optimizer_of(optimizer)
    merged = merge(model, generator, compensate=compensate)
    adapters = adapter_parameters(model)
    synced = _is_deepspeed(optimizer)
    if synced:
        from deepspeed.utils import safe_set_full_fp32_param

        for p in adapters:
            safe_set_full_fp32_param(p, p.detach().float())
    fraction = reset_optimizer_state(optimizer, adapters, ratio=reset_ratio, method=reset_method, generator=generator)
    return RestartResult(
        merged_layers=merged.layers, reset_fraction=fraction, synced_fp32_masters=synced, lost_share=merged.lost_share
    )


def fastest_adamw(groups: list[dict]) -> dict:
    """``fused=True`` where PyTorch has a fused AdamW kernel for the parameters' device (CUDA and,
    since 2.4, CPU among them): one kernel a step, not one per tensor. Else ``foreach=True``."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = [p for group in groups for p in group["params"]]
    floats = all(p.is_floating_point() for p in params)
    devices = {p.device.type for p in params}
    if floats and devices and devices <= set(_get_fused_kernels_supported_devices()):
        return {"fused": True}
    return {"foreach": True}


def make_optimizer(
    model: nn.Module,
    config: ReLoRAConfig,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    step: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups(model)`` and the jagged cosine schedule, positioned at ``step``.

    Built again at the switch to low rank (the trainable set changes there). Hand both to
    ``deepspeed.initialize`` under DeepSpeed, or step them yourself in a plain loop. The
    AdamW is PyTorch's fused one where the device has it (``fastest_adamw``); with
    ``method="galore"`` it is GaLore's (``relora.galore``), which DeepSpeed ZeRO cannot hold.
    """
    if config.method == "galore":
        from relora.galore import galore_adamw, galore_param_groups

        optimizer = galore_adamw(galore_param_groups(model, config, weight_decay=weight_decay), lr=lr, betas=betas)
    else:
        groups = param_groups(model, weight_decay=weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, **fastest_adamw(groups))
    for group in optimizer.param_groups:
        group["initial_lr"] = lr  # what LambdaLR scales when it starts from step > 0
    scheduler = jagged_cosine_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        jags=config.jag_steps(total_steps),
        restart_warmup_steps=config.restart_warmup_steps,
        min_lr_ratio=min_lr_ratio,
        last_epoch=step - 1,
    )
    return optimizer, scheduler
