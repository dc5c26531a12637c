"""GaLore (Zhao et al., 2024), the baseline next to ReLoRA: full-rank weights, low-rank Adam state.

GaLore keeps no adapters. Its AdamW (the `galore-torch` package, Apache-2.0) projects each
target layer's 2-D gradient onto ``rank`` of its singular vectors, recomputed every
``update_proj_gap`` steps, keeps Adam's moments in that small space and projects the update
back, scaled by ``galore_scale``. Every other parameter gets plain AdamW. A d x d layer's
moments are 2·r·d numbers instead of 2·d²: that is the memory GaLore saves. Its weights and
their gradients stay full size.

Three things the package leaves to its caller:

- its optimizer state holds a ``GaLoreProjector`` object per projected weight, which
  ``Optimizer.state_dict`` would hand to pickle; ``optimizer_state`` turns it into tensors and
  numbers, so that a checkpoint holds no pickle (safetensors and JSON will do) and resumes
  with the same projection (``load_optimizer_state``);
- its projection of an fp32 gradient is a view of the whole SVD factor, which stays in
  memory with it: ``galore_adamw`` copies out the ``rank`` rows it uses after each step;
- it needs each gradient in its weight's 2-D shape, which DeepSpeed ZeRO flattens into
  partitions: GaLore runs under plain data parallelism (PyTorch DDP) only.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from relora.recipe import ReLoRAConfig

PROJECTOR = "projector"
PROJECTOR_FIELDS = ("rank", "update_proj_gap", "scale", "proj_type")


def galore_param_groups(model: nn.Module, config: ReLoRAConfig, *, weight_decay: float = 0.0) -> list[dict]:
    """The target layers' weights in a group that carries GaLore's settings; the rest as plain AdamW
    groups (no weight decay on biases and norms, as ``relora.param_groups`` does)."""
    projected = [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.target_modules
    ]
    if not projected:
        raise ValueError(f"no linear layer of the model matches target_modules {list(config.target_modules)}")
    projected_ids = {id(p) for p in projected}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in projected_ids]
    groups = [
        {"name": "decay", "params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        {
            "name": "galore",
            "params": projected,
            "weight_decay": weight_decay,
            "rank": config.rank,
            "update_proj_gap": config.update_proj_gap,
            "scale": config.galore_scale,
            "proj_type": config.proj_type,
        },
    ]
    return [g for g in groups if g["params"]]


def galore_adamw(groups: list[dict], *, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """galore-torch's AdamW over ``groups`` (an optional dependency, imported here)."""
    # bitsandbytes, which galore-torch imports, warns on CPUs about a kernel it would fetch
    # from the hub for 4-bit layers; GaLore's AdamW uses none of them.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as error:
        raise ImportError(f"method 'galore' needs galore-torch (pip install galore-torch): {error}") from None
    optimizer = GaLoreAdamW(groups, lr=lr, betas=betas, no_deprecation_warning=True)
    optimizer.register_step_post_hook(_compact_projections)
    return optimizer


def _compact_projections(optimizer: torch.optim.Optimizer, *_) -> None:
    """Keep only the ``rank`` rows or columns of each new projection, not the whole SVD factor.

    galore-torch's projector keeps ``Vh[:rank]`` (or ``U[:, :rank]``) of fp32 gradients as a
    view, which holds the whole factor in memory: a d x d matrix per square layer where r x d
    was meant (bf16 gradients get a copy). Measured with ``relora.memory_breakdown`` on the
    tiny model, that was 40% of GaLore's optimizer state.
    """
    for state in optimizer.state.values():
        projector = state.get(PROJECTOR)
        if projector is None or projector.ortho_matrix is None:
            continue
        matrix = projector.ortho_matrix
        factors = matrix if isinstance(matrix, list) else [matrix]
        if any(f.untyped_storage().nbytes() > f.numel() * f.element_size() for f in factors):
            compact = [f.clone() for f in factors]
            projector.ortho_matrix = compact if isinstance(matrix, list) else compact[0]


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with each GaLore projector as a dict of tensors and numbers."""
    state = optimizer.state_dict()
    portable = {}
    for index, entry in state["state"].items():
        projector = entry.get(PROJECTOR)
        if projector is not None:
            entry = {**entry, PROJECTOR: _projector_fields(projector)}
        portable[index] = entry
    return {**state, "state": portable}


def _projector_fields(projector) -> dict:
    fields = {name: getattr(projector, name) for name in PROJECTOR_FIELDS}
    matrix = projector.ortho_matrix  # None before the first step; two factors for proj_type "full"
    fields["ortho_matrix"] = list(matrix) if isinstance(matrix, (list, tuple)) else matrix
    return fields


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of ``optimizer_state``: load it and rebuild the projectors, on the parameters' devices."""
    plain = {index: {k: v for k, v in entry.items() if k != PROJECTOR} for index, entry in state["state"].items()}
    optimizer.load_state_dict({**state, "state": plain})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        fields = entry.get(PROJECTOR)
        if fields is None:
            continue
        from galore_torch.galore_projector import GaLoreProjector

        param = params[index]
        settings = {name: fields[name] for name in PROJECTOR_FIELDS if name != "rank"}
        projector = GaLoreProjector(fields["rank"], **settings)
        matrix = copy.copy(fields["ortho_matrix"])
        if isinstance(matrix, list):
            matrix = [m.to(param.device) for m in matrix]
        elif matrix is not None:
            matrix = matrix.to(param.device)
        projector.ortho_matrix = matrix
        optimizer.state[param][PROJECTOR] = projector
