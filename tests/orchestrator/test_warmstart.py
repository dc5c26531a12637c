import pytest

from orchestrator.config import config_from_dict
from orchestrator.data import PreparedData
from orchestrator.search import load_sweep
from orchestrator.warmstart import WarmStartStore, count_warm_starts, shareable_configs, warm_start_key

DATA = PreparedData("p", "t", "fingerprint", 4096, 64, 100, 10, True)


def _key(make_trial, **overrides):
    return warm_start_key(config_from_dict(make_trial(**overrides)), DATA)


def test_settings_used_only_after_the_warm_start_share_it(make_trial):
    base = _key(make_trial)
    assert base is not None
    assert _key(make_trial, relora__rank=8) == base
    assert _key(make_trial, relora__reset_ratio=0.5) == base
    assert _key(make_trial, train__eval_every=5) == base
    # The warm start follows the plain envelope: the restart period and its re-warm come after it.
    assert _key(make_trial, relora__restart_every=10, relora__restart_warmup_steps=3) == base
    assert _key(make_trial, relora__restart_every=7) == base
    assert _key(make_trial, relora__jagged=False) == base
    assert _key(make_trial, relora__method="lora") == base


@pytest.mark.parametrize(
    "override",
    [
        {"optim__lr": 0.001},
        {"seed": 1},
        {"relora__warm_start_steps": 10},
        {"optim__min_lr_ratio": 0.2},
        {"train__total_steps": 80},
        {"train__global_batch_size": 32},
        {"model__name": "llama-mini"},
    ],
)
def test_settings_that_shape_the_warm_start_do_not(make_trial, override):
    if "seed" in override:
        trial = make_trial()
        trial["seed"] = 1
        assert warm_start_key(config_from_dict(trial), DATA) != _key(make_trial)
    else:
        assert _key(make_trial, **override) != _key(make_trial)


def test_no_warm_start_no_key(make_trial):
    assert _key(make_trial, relora__method="full") is None
    assert _key(make_trial, relora__warm_start_steps=0) is None


def test_grid_points_are_shared_and_sampled_shaping_params_are_not(make_trial):
    grid = load_sweep(
        {**make_trial(), "search": {"params": {"relora.rank": {"grid": [2, 4]}}, "scheduler": {"grace_period": 30}}}
    )
    keys = {warm_start_key(c, DATA) for c in shareable_configs(grid)}
    assert len(keys) == 1
    sampled = load_sweep(
        {
            **make_trial(),
            "search": {"params": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "scheduler": {"grace_period": 30}},
        }
    )
    assert shareable_configs(sampled) == []


def test_store_round_trip(tmp_path):
    store = WarmStartStore(str(tmp_path))
    assert store.get("abc") is None
    store.put("abc", "/some/checkpoint")
    assert WarmStartStore(str(tmp_path)).get("abc") == "/some/checkpoint"


@pytest.mark.parametrize(
    ("name", "expected"), [("restart.yaml", 1), ("reset.yaml", 1), ("rank.yaml", 1), ("demo.yaml", 2)]
)
def test_the_shipped_sweeps_need_one_warm_start_per_setting_that_shapes_it(name, expected):
    from pathlib import Path

    from orchestrator.config import load_yaml

    spec = load_sweep(load_yaml(str(Path(__file__).resolve().parents[2] / "search_spaces" / name)))
    assert count_warm_starts(spec) == (expected, 0)  # demo.yaml sweeps the LR, which shapes it
