"""The jagged cosine learning-rate schedule.

A linear warmup, then cosine decay to ``min_lr_ratio``. Restarts fall on every multiple
of ``restart_every``: there the multiplier drops to zero and climbs linearly, over
``restart_warmup_steps``, to the value the cosine envelope has at the end of that climb.
Fresh adapters with pruned optimizer state would otherwise take full-size steps at once.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def check_schedule_args(
    *,
    total_steps: int,
    warmup_steps: int,
    restart_every: int | None,
    restart_warmup_steps: int,
    min_lr_ratio: float,
) -> None:
    """Raise ``ValueError`` naming the first argument that makes no schedule."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}), got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio!r}")
    if restart_every is not None:
        if restart_every <= 0:
            raise ValueError(f"restart_every must be positive (or None for no restarts), got {restart_every!r}")
        if not 0 < restart_warmup_steps < restart_every:
            raise ValueError(
                f"restart_warmup_steps must lie in (0, restart_every={restart_every}), got {restart_warmup_steps!r}"
            )


def cosine_envelope(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def jagged_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_every: int | None,
    restart_warmup_steps: int,
    min_lr_ratio: float,
) -> float:
    """The LR multiplier at ``step``. ``restart_every=None`` gives the plain cosine."""
    check_schedule_args(
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        restart_every=restart_every,
        restart_warmup_steps=restart_warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    envelope = partial(cosine_envelope, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    if restart_every is None or step < restart_every:
        return envelope(step)
    since_restart = step % restart_every
    if since_restart >= restart_warmup_steps:
        return envelope(step)
    climb_end = step - since_restart + restart_warmup_steps
    return envelope(climb_end) * since_restart / restart_warmup_steps


def jagged_cosine_scheduler(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_every: int | None,
    restart_warmup_steps: int,
    min_lr_ratio: float,
    last_epoch: int = -1,
) -> LambdaLR:
    """A ``LambdaLR`` following ``jagged_cosine``; call ``scheduler.step()`` once per optimizer step."""
    lr_lambda = partial(
        jagged_cosine,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        restart_every=restart_every,
        restart_warmup_steps=restart_warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    lr_lambda(0)  # validate now, not at the first step
    return LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)
