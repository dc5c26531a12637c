import pytest

import relora


def test_full_never_wraps_or_restarts():
    cfg = relora.ReLoRAConfig(method="full", restart_every=10, restart_warmup_steps=2)
    assert not any(cfg.wraps_at(s) for s in range(100)) and cfg.restart_steps(100) == []
    assert cfg.lr_restart_every is None


def test_lora_wraps_once_after_the_warm_start():
    cfg = relora.ReLoRAConfig(method="lora", warm_start_steps=20, restart_every=10, restart_warmup_steps=2)
    assert [s for s in range(100) if cfg.wraps_at(s)] == [20]
    assert cfg.restart_steps(100) == [] and cfg.lr_restart_every is None


def test_relora_restarts_after_the_warm_start():
    cfg = relora.ReLoRAConfig(method="relora", warm_start_steps=20, restart_every=10, restart_warmup_steps=2)
    assert [s for s in range(100) if cfg.wraps_at(s)] == [20]
    assert cfg.restart_steps(60) == [30, 40, 50]
    assert cfg.lr_restart_every == 10
    assert relora.ReLoRAConfig(restart_every=10, restart_warmup_steps=2, jagged=False).lr_restart_every is None


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
