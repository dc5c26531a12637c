"""The jagged cosine learning-rate schedule.

A linear warmup, then cosine decay to ``min_lr_ratio``: the *envelope*. At each step of
``jags`` the multiplier drops to zero and climbs linearly, over ``restart_warmup_steps``, to
the value the envelope has at the end of that climb. Fresh adapters with pruned optimizer
state would otherwise take full-size steps at once.

The jags are given as steps, not as a period: ``ReLoRAConfig.jag_steps`` lists the restarts
(``restarts_at``, the same steps that merge) and the switch to low rank after a full-rank warm
start. The warm start itself follows the plain envelope, as the paper's warm start is an
ordinary full-rank run.

Against the reference code (Guitaricet/relora, ``peft_pretraining/training_utils.py``,
``get_cosine_schedule_with_multiple_warmups``):

- Same: the linear re-warm from zero to the envelope's value at the end of the climb, and
  the cosine to ``min_lr_ratio``.
- Different: the reference trains its warm start as a separate run with a plain cosine
  (``--warmed_up_model``), then starts a new schedule for the ReLoRA run: a fresh linear
  warmup and a cosine over the remaining steps only, with ``--adjust_step`` to line its
  restarts up with the warm start's length. Here the whole run is one envelope, so a trial
  that starts from a shared warm start continues exactly where its own warm start would have
  ended, and the restarts fall on multiples of ``restart_every`` counted from step 0 (what
  ``--adjust_step`` is for). The switch gets a re-warm of ``restart_warmup_steps``, not a new
  full warmup. The reference also returns ``1e-7`` rather than 0 on some first steps of a cycle
  (in its plain cyclical cosine); here the jag step's LR is exactly 0.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def check_schedule_args(
    *,
    total_steps: int,
    warmup_steps: int,
    jags: Sequence[int],
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
    if jags:
        if restart_warmup_steps <= 0:
            raise ValueError(f"restart_warmup_steps must be positive where the LR jags, got {restart_warmup_steps!r}")
        if any(not 0 < j < total_steps for j in jags) or any(a >= b for a, b in zip(jags, jags[1:], strict=False)):
            raise ValueError(f"jags must be increasing steps in (0, total_steps={total_steps}), got {list(jags)[:8]}")


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
    jags: Sequence[int] = (),
    restart_warmup_steps: int = 0,
    min_lr_ratio: float,
) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based). No ``jags``: the plain cosine."""
    check_schedule_args(
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        jags=jags,
        restart_warmup_steps=restart_warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    envelope = partial(cosine_envelope, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    last = bisect.bisect_right(jags, step) - 1  # the latest jag at or before this step
    if last < 0 or step - jags[last] >= restart_warmup_steps:
        return envelope(step)
    since_jag = step - jags[last]
    return envelope(jags[last] + restart_warmup_steps) * since_jag / restart_warmup_steps


def jagged_cosine_scheduler(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    jags: Sequence[int] = (),
    restart_warmup_steps: int = 0,
    min_lr_ratio: float,
    last_epoch: int = -1,
) -> LambdaLR:
    """A ``LambdaLR`` following ``jagged_cosine``; call ``scheduler.step()`` once per optimizer step."""
    lr_lambda = partial(
        jagged_cosine,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        jags=tuple(jags),
        restart_warmup_steps=restart_warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    lr_lambda(0)  # validate now, not at the first step
    return LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)
