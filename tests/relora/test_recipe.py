import pytest

import relora


def test_full_never_wraps_or_restarts():
    cfg = relora.ReLoRAConfig(method="full", restart_every=10, restart_warmup_steps=2)
    assert not any(cfg.wraps_at(s) for s in range(100)) and cfg.restart_steps(100) == []
    assert cfg.jag_steps(100) == []


def test_lora_wraps_once_after_the_warm_start():
    cfg = relora.ReLoRAConfig(method="lora", warm_start_steps=20, restart_every=10, restart_warmup_steps=2)
    assert [s for s in range(100) if cfg.wraps_at(s)] == [20]
    assert cfg.restart_steps(100) == []
    assert cfg.jag_steps(100) == [20], "fresh adapters and a fresh optimizer at the switch: the LR re-warms"


def test_relora_restarts_after_the_warm_start():
    cfg = relora.ReLoRAConfig(method="relora", warm_start_steps=20, restart_every=10, restart_warmup_steps=2)
    assert [s for s in range(100) if cfg.wraps_at(s)] == [20]
    assert cfg.restart_steps(60) == [30, 40, 50]
    assert cfg.jag_steps(60) == [20, 30, 40, 50], "the switch and the restarts: one definition"
    assert relora.ReLoRAConfig(restart_every=10, restart_warmup_steps=2, jagged=False).jag_steps(60) == []


def test_no_warm_start_no_jag_at_the_switch():
    cfg = relora.ReLoRAConfig(restart_every=10, restart_warmup_steps=2)
    assert cfg.wraps_at(0) and cfg.jag_steps(40) == [10, 20, 30]


@pytest.mark.parametrize(
    ("warm_start", "restart_every", "jags"),
    [(20, 10, [20, 30, 40, 50]), (20, 20, [20, 40]), (20, 25, [20, 25, 50]), (20, 40, [20, 40])],
)
def test_the_lr_jags_only_at_the_switch_and_the_restarts(warm_start, restart_every, jags):
    cfg = relora.ReLoRAConfig(warm_start_steps=warm_start, restart_every=restart_every, restart_warmup_steps=3)
    assert cfg.jag_steps(60) == jags
    assert cfg.restart_steps(60) == [j for j in jags if j != warm_start]


def test_an_evaluation_inside_a_re_warm_is_flagged():
    cfg = relora.ReLoRAConfig(warm_start_steps=20, restart_every=25, restart_warmup_steps=5)  # jags at 20, 25, 50
    inside = [s for s in range(61) if cfg.rewarming_after(s)]
    # After s steps: steps 20..24 climb from the switch, 25..29 from the restart at 25, 50..54 from the one at 50.
    assert inside == list(range(21, 31)) + list(range(51, 56))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "qlora"}, "method"),
        ({"rank": 0}, "rank"),
        ({"reset_ratio": 1.2}, "reset_ratio"),
        ({"reset_method": "l2"}, "reset_method"),
        ({"restart_every": 10, "restart_warmup_steps": 10}, "restart_warmup_steps"),
        ({"warm_start_steps": -1}, "warm_start_steps"),
        ({"target_modules": ()}, "target_modules"),
    ],
)
def test_bad_config_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        relora.ReLoRAConfig(**kwargs)
