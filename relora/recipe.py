"""When to wrap, merge and reset: one config drives full-rank, LoRA, ReLoRA and GaLore alike.

A run is ``total_steps`` optimizer steps. The first ``warm_start_steps`` train the
whole model (full-rank warm start); then, unless ``method`` is ``"full"``, the target
layers are wrapped with adapters. With ``method="relora"`` every multiple of
``restart_every`` after that is a restart: merge, re-initialise, partially reset the
adapters' optimizer state, and (with ``jagged``) re-warm the learning rate. The switch to
low rank after a warm start re-warms it too (fresh adapters, a fresh optimizer); the warm
start itself follows the plain cosine. ``restarts_at`` is the one definition of a restart
step: the merges and the LR jags (``jag_steps``) both read it.
Baselines are the same loop with fewer events, so comparisons are fair by construction.
``method="galore"`` (Zhao et al., 2024) wraps nothing and never restarts: every weight trains
full-rank, and its optimizer projects the target layers' gradients to ``rank``
(``relora.galore``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from relora.layers import LLAMA_TARGET_MODULES, HyperparameterError, _check_adapter_args
from relora.optim import RESET_METHODS

Method = Literal["full", "lora", "relora", "galore"]
METHODS = get_args(Method)
ProjectionType = Literal["std", "reverse_std", "right", "left", "full"]
PROJECTION_TYPES = get_args(ProjectionType)


@dataclass(frozen=True)
class ReLoRAConfig:
    """The method's hyperparameters. Validated on construction; errors name the field."""

    method: Method = "relora"
    rank: int = 128
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_TARGET_MODULES
    trainable_scaling: bool = False
    warm_start_steps: int = 0
    restart_every: int = 1000
    restart_warmup_steps: int = 50
    reset_ratio: float = 0.99
    reset_method: Literal["magnitude", "random"] = "magnitude"
    jagged: bool = True
    # GaLore only: `rank` is the rank its optimizer projects the target layers' gradients to,
    # the projection is recomputed (an SVD of the gradient) every `update_proj_gap` steps, and
    # the projected-back update is scaled by `galore_scale` (the paper's 200 and 0.25).
    update_proj_gap: int = 200
    galore_scale: float = 0.25
    proj_type: ProjectionType = "std"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HyperparameterError("method", f"must be one of {METHODS}, got {self.method!r}")
        _check_adapter_args(rank=self.rank, alpha=self.alpha, dropout=self.dropout)
        if not self.target_modules:
            raise HyperparameterError("target_modules", "must name at least one module")
        if self.warm_start_steps < 0:
            raise HyperparameterError("warm_start_steps", f"must be non-negative, got {self.warm_start_steps!r}")
        if self.restart_every <= 0:
            raise HyperparameterError("restart_every", f"must be positive, got {self.restart_every!r}")
        if not 0 < self.restart_warmup_steps < self.restart_every:
            raise HyperparameterError(
                "restart_warmup_steps",
                f"must lie in (0, restart_every={self.restart_every}), got {self.restart_warmup_steps!r}",
            )
        if not 0.0 <= self.reset_ratio <= 1.0:
            raise HyperparameterError("reset_ratio", f"must lie in [0, 1], got {self.reset_ratio!r}")
        if self.reset_method not in RESET_METHODS:
            raise HyperparameterError("reset_method", f"must be one of {RESET_METHODS}, got {self.reset_method!r}")
        if self.update_proj_gap <= 0:
            raise HyperparameterError("update_proj_gap", f"must be positive, got {self.update_proj_gap!r}")
        if not 0 < self.galore_scale <= 1e3:
            raise HyperparameterError("galore_scale", f"must lie in (0, 1000], got {self.galore_scale!r}")
        if self.proj_type not in PROJECTION_TYPES:
            raise HyperparameterError("proj_type", f"must be one of {PROJECTION_TYPES}, got {self.proj_type!r}")
        if self.method == "galore" and self.warm_start_steps:
            raise HyperparameterError(
                "warm_start_steps",
                f"must be 0 with method 'galore' (it trains full-rank weights from the start), "
                f"got {self.warm_start_steps!r}",
            )

    @property
    def low_rank(self) -> bool:
        """Whether the run trains adapters (LoRA, ReLoRA): GaLore's low rank is in its optimizer."""
        return self.method in ("lora", "relora")

    def wraps_at(self, step: int) -> bool:
        """Whether the adapters go in before optimizer step ``step`` (0-based)."""
        return self.low_rank and step == self.warm_start_steps

    def restarts_at(self, step: int) -> bool:
        """Whether a merge-and-reset happens before optimizer step ``step``: the step whose LR the
        jagged schedule sets to zero (one step earlier than the reference code: relora.optim)."""
        return self.method == "relora" and step > self.warm_start_steps and step % self.restart_every == 0

    def restart_steps(self, total_steps: int) -> list[int]:
        return [s for s in range(total_steps) if self.restarts_at(s)]

    def jags_at(self, step: int) -> bool:
        """Whether the LR drops to zero at ``step`` and re-warms: at each restart, and at the
        switch to low rank when a warm start comes before it."""
        if not self.jagged:
            return False
        return self.restarts_at(step) or (self.warm_start_steps > 0 and self.wraps_at(step))

    def jag_steps(self, total_steps: int) -> list[int]:
        """The steps ``jagged_cosine`` takes as ``jags``."""
        return [s for s in range(total_steps) if self.jags_at(s)]

    def rewarming_after(self, steps_done: int) -> bool:
        """Whether a model evaluated after ``steps_done`` optimizer steps is inside a re-warm:
        within ``restart_warmup_steps`` after a jag, where the loss spikes. A scheduler that
        compares trials should not judge one there."""
        first = max(0, steps_done - self.restart_warmup_steps)
        return any(self.jags_at(j) for j in range(first, steps_done))
