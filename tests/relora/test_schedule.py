import math

import pytest
import torch

import relora

KW = dict(total_steps=1000, warmup_steps=50, jags=(200, 400, 600, 800), restart_warmup_steps=20, min_lr_ratio=0.1)


def envelope(step):
    return relora.cosine_envelope(step, total_steps=1000, warmup_steps=50, min_lr_ratio=0.1)


def test_envelope_formula():
    assert envelope(0) == 0.0 and envelope(25) == pytest.approx(0.5) and envelope(50) == pytest.approx(1.0)
    step = 600
    progress = (step - 50) / 950
    assert envelope(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert envelope(1000) == pytest.approx(0.1)


@pytest.mark.parametrize("restart", [200, 400, 600, 800])
def test_values_at_restart_boundaries(restart):
    lr = lambda s: relora.jagged_cosine(s, **KW)  # noqa: E731
    assert lr(restart - 1) == pytest.approx(envelope(restart - 1))
    assert lr(restart) == 0.0
    assert lr(restart + 5) == pytest.approx(envelope(restart + 20) * 5 / 20)
    assert lr(restart + 10) == pytest.approx(envelope(restart + 20) * 10 / 20)
    assert lr(restart + 19) == pytest.approx(envelope(restart + 20) * 19 / 20)
    assert lr(restart + 20) == pytest.approx(envelope(restart + 20))
    assert lr(restart + 100) == pytest.approx(envelope(restart + 100))


def test_no_jags_is_the_plain_cosine():
    for step in range(0, 1000, 37):
        assert relora.jagged_cosine(step, **{**KW, "jags": ()}) == pytest.approx(envelope(step))


@pytest.mark.parametrize("restart_every", [100, 300, 500])  # smaller than, equal to, larger than the warm start
def test_the_warm_start_follows_the_envelope_and_the_lr_jags_at_the_switch_and_each_restart(restart_every):
    warm_start, total, rewarm = 300, 1000, 20
    cfg = relora.ReLoRAConfig(warm_start_steps=warm_start, restart_every=restart_every, restart_warmup_steps=rewarm)
    restarts = cfg.restart_steps(total)
    lr = lambda s: relora.jagged_cosine(  # noqa: E731
        s, total_steps=total, warmup_steps=50, jags=cfg.jag_steps(total), restart_warmup_steps=rewarm, min_lr_ratio=0.1
    )
    # The full-rank warm start: the plain envelope at every step, whatever the restart period.
    assert [lr(s) for s in range(warm_start)] == pytest.approx([envelope(s) for s in range(warm_start)])
    # The switch and each restart: zero, then the climb to the envelope at the climb's end.
    assert restarts == [s for s in range(warm_start + 1, total) if s % restart_every == 0]
    for jag in [warm_start, *restarts]:
        assert lr(jag) == 0.0
        assert lr(jag + rewarm // 2) == pytest.approx(envelope(jag + rewarm) / 2)
        assert lr(jag + rewarm) == pytest.approx(envelope(jag + rewarm))
    # Nowhere else: between the climbs, the envelope.
    climbing = {s for jag in [warm_start, *restarts] for s in range(jag, jag + rewarm)}
    rest = [s for s in range(total) if s not in climbing]
    assert [lr(s) for s in rest] == pytest.approx([envelope(s) for s in rest])


def test_scheduler_follows_the_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = relora.jagged_cosine_scheduler(optimizer, **KW)
    seen = []
    for _ in range(450):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * relora.jagged_cosine(s, **KW) for s in range(450)])
    assert seen[200] == 0.0 and seen[400] == 0.0


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"restart_warmup_steps": 0}, "restart_warmup_steps"),
        ({"jags": (400, 200)}, "jags"),
        ({"jags": (0, 200)}, "jags"),
        ({"jags": (200, 1000)}, "jags"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 1000}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ],
)
def test_bad_arguments_name_themselves(override, name):
    with pytest.raises(ValueError, match=name):
        relora.jagged_cosine(0, **{**KW, **override})
    with pytest.raises(ValueError, match=name):
        relora.jagged_cosine_scheduler(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), **{**KW, **override}
        )
