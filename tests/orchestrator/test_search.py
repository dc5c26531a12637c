import pytest
import yaml

from orchestrator.config import ConfigError
from orchestrator.search import load_sweep, tune_param_space

ASHA = {"type": "asha", "grace_period": 30}  # past the 20-step shared warm start


def _sweep(make_trial, **search):
    return {**make_trial(), "search": {"params": {"relora.rank": {"grid": [2, 4]}}, "scheduler": ASHA, **search}}


def test_a_valid_sweep_resolves_its_trials(make_trial):
    spec = load_sweep(_sweep(make_trial, variants={"no-reset": {"relora.reset_ratio": 0.0}, "relora": {}}))
    assert spec.num_trials == 4
    assert spec.base_config.scaling.num_workers == 2
    space = tune_param_space(spec)
    assert set(space) == {"relora.rank", "variant"}
    resolved = spec.trial({"relora.rank": 2, "variant": "no-reset"})
    assert resolved.relora.rank == 2 and resolved.relora.reset_ratio == 0.0
    assert resolved.train == spec.base_config.train  # the rest as the driver resolved it


def test_each_variant_may_sweep_its_own_learning_rates(make_trial):
    """A fair comparison of methods: every method at its own best LR, found in one sweep."""
    variants = {
        "full": {"relora.method": "full", "optim.lr": {"grid": [0.003, 0.001]}},
        "galore": {"relora.method": "galore", "relora.warm_start_steps": 0, "optim.lr": {"grid": [0.01]}},
        "relora": {},
    }
    spec = load_sweep({**make_trial(), "search": {"variants": variants, "scheduler": {"type": "none"}}})
    assert list(spec.search.variants) == ["full lr=0.003", "full lr=0.001", "galore lr=0.01", "relora"]
    assert spec.num_trials == 4
    galore = spec.trial({"variant": "galore lr=0.01"})
    assert (galore.relora.method, galore.optim.lr, galore.engine) == ("galore", 0.01, "ddp")
    assert spec.trial({"variant": "full lr=0.001"}).optim.lr == 0.001
    assert spec.trial({"variant": "relora"}).optim.lr == spec.base_config.optim.lr


def test_a_sweep_may_maximise_throughput(make_trial):
    spec = load_sweep(_sweep(make_trial, metric="tokens_per_s", mode="max"))
    assert (spec.search.metric, spec.search.mode) == ("tokens_per_s", "max")


@pytest.mark.parametrize(
    ("search", "path"),
    [
        ({"params": {"relora.rnk": {"grid": [2]}}}, "search.params.relora.rnk"),
        ({"params": {"relora": {"grid": [2]}}}, "search.params.relora"),
        ({"params": {"relora.rank": {"normal": [0, 1]}}}, "search.params.relora.rank"),
        ({"params": {"optim.lr": {"loguniform": [0, 1]}}}, "search.params.optim.lr"),
        ({"params": {"optim.lr": {"uniform": [0.1]}}}, "search.params.optim.lr"),
        # An impossible combination names the violated key and the swept values that broke it.
        ({"params": {"relora.restart_every": {"grid": [20, 5]}}}, "relora.restart_warmup_steps"),
        ({"params": {"relora.rank": {"randint": [0, 4]}}}, "search.params.relora.rank"),
        ({"params": {"scaling.num_workers": {"grid": [1, 2]}}}, "search.params.scaling.num_workers"),
        ({"num_samples": 0}, "search.num_samples"),
        ({"scheduler": {"type": "hyperband"}}, "search.scheduler.type"),
        ({"scheduler": {"grace_period": 100}}, "search.scheduler.grace_period"),
        ({"scheduler": {"grace_period": 20}}, "search.scheduler.grace_period"),  # not past the warm start
        ({"resources": {"num_workers": 3}}, "train.global_batch_size"),
        ({"metrc": "val_ppl"}, "search.metrc"),
        ({"variants": {"bad": {"relora.nope": 1}}}, "search.variants.bad.relora.nope"),
        ({"variants": {"g": {"optim.lr": {"grid": []}}}}, "search.variants.g.optim.lr"),
        ({"variants": {"g": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}}, "search.variants.g.optim.lr"),
        # a value of one gridded variant that makes no trial names the key, as any sample does
        (
            {"variants": {"g": {"relora.method": "galore", "optim.lr": {"grid": [0.01, 20.0]}}}},
            "relora.warm_start_steps",
        ),
        ({"variants": {"g": {"relora.warm_start_steps": 0, "optim.lr": {"grid": [0.01, 20.0]}}}}, "optim.lr"),
    ],
)
def test_bad_sweeps_name_the_path(make_trial, search, path):
    trial = {key: value for key, value in make_trial().items() if key != "scaling"}  # a sweep's is search.resources
    data = {**trial, "search": {"params": {}, "scheduler": ASHA, **search}}
    with pytest.raises(ConfigError) as error:
        load_sweep(data)
    assert error.value.path == path, str(error.value)
    if "restart_every" in str(search):
        assert "(with relora.restart_every=5)" in str(error.value)


def test_cli_dry_run_and_bad_file(make_trial, tmp_path):
    from conftest import run_cli

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_sweep(make_trial)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_sweep(make_trial, params={"relora.rank": {"grid": [0]}})))
    refused, dry, samples = run_cli(  # the refusal first: a dry run may import Ray
        "orchestrator.sweep",
        [[str(bad)], [str(good), "--dry-run"], [str(good), "--dry-run", "--set", "search.num_samples=3"]],
    )
    assert dry["code"] == 0, dry["stderr"]
    assert "2 trials" in dry["stdout"] and "relora.rank: grid [2, 4]" in dry["stdout"] and "2 workers" in dry["stdout"]
    assert samples["code"] == 0 and "6 trials (2 grid points x 3 samples)" in samples["stdout"], samples["stderr"]
    assert refused["code"] == 2 and not refused["ray_imported"]
    assert refused["stderr"].strip().splitlines() == [refused["stderr"].strip()]
    assert refused["stderr"].startswith("config error: search.params.relora.rank:")


@pytest.mark.parametrize("name", ["demo", "rank", "restart", "reset", "ablation", "baselines"])
def test_shipped_search_spaces_are_valid(name):
    from pathlib import Path

    from orchestrator.config import load_yaml

    spec = load_sweep(load_yaml(Path(__file__).resolve().parents[2] / "search_spaces" / f"{name}.yaml"))
    assert spec.num_trials >= 4


def test_gpus_per_worker_is_passed_as_given_and_bounded(make_trial):
    from orchestrator.data import PreparedData
    from orchestrator.sweep import describe
    from orchestrator.train import make_trainer

    one_worker = _sweep(make_trial, resources={"num_workers": 1, "gpus_per_worker": 0.5})
    one_worker["scaling"] = {}
    spec = load_sweep(one_worker)
    assert spec.base_config.scaling.use_gpu is True and spec.base_config.scaling.gpus_per_worker == 0.5
    assert "1 worker x (1 CPU, 0.5 GPU)" in describe(spec)  # --dry-run prints what Ray is asked for
    data = PreparedData("/data", "/tokenizer", "f", 256, 64, 100, 10, True)
    trainer = make_trainer(spec.base_config, data, name="t", storage_path="/tmp/unused")
    assert trainer.scaling_config.resources_per_worker["GPU"] == 0.5
    cpu_only = load_sweep(_sweep(make_trial))
    assert cpu_only.base_config.scaling.use_gpu is False and "(1 CPU, 0 GPU)" in describe(cpu_only)
    with pytest.raises(ConfigError, match=r"^search.resources.gpus_per_worker: must lie in \[0, 1\]"):
        load_sweep(_sweep(make_trial, resources={"gpus_per_worker": 2}))
    # Two ranks of one trial on one GPU: NCCL would refuse them at the trial's start.
    with pytest.raises(ConfigError, match=r"^search.resources.gpus_per_worker: a fraction \(0.5\) packs"):
        load_sweep(_sweep(make_trial, resources={"num_workers": 2, "gpus_per_worker": 0.5}))


def test_the_resolved_trial_reaches_the_workers_unchanged(make_trial):
    """The driver resolves each trial once; the TorchTrainer hands that object to its workers."""
    from orchestrator.data import PreparedData
    from orchestrator.train import make_trainer

    spec = load_sweep(_sweep(make_trial))
    cfg = spec.trial({"relora.rank": 4})
    data = PreparedData(
        "/nowhere", "/nowhere", "f", vocab_size=300, seq_len=64, train_blocks=1, validation_blocks=1, cache_hit=True
    )
    trainer = make_trainer(cfg, data, name="unused", storage_path="/tmp/unused", warm_start=None)
    assert trainer.train_loop_config["trial"] is cfg
