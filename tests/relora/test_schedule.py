import math

import pytest
import torch

import relora

KW = dict(total_steps=1000, warmup_steps=50, restart_every=200, restart_warmup_steps=20, min_lr_ratio=0.1)


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


def test_no_restarts_is_the_plain_cosine():
    for step in range(0, 1000, 37):
        assert relora.jagged_cosine(step, **{**KW, "restart_every": None}) == pytest.approx(envelope(step))


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
        ({"restart_warmup_steps": 200}, "restart_warmup_steps"),
        ({"restart_warmup_steps": 300}, "restart_warmup_steps"),
        ({"restart_every": 0}, "restart_every"),
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
