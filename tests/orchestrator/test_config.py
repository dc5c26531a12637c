import pytest
import yaml

from orchestrator.config import ConfigError, check_environment, config_from_dict, load_config


def test_the_test_trial_is_valid(make_trial, tmp_path):
    cfg = config_from_dict(make_trial())
    assert cfg.grad_accum_steps == 2  # 16 / (4 * 2)
    assert cfg.relora.restart_steps(cfg.train.total_steps) == [40, 60]


def _with(make_trial, section, key, value):
    data = make_trial()
    data[section][key] = value
    if (section, key) == ("data", "paths"):
        data["data"]["source"] = "file"  # the test trial may use the built-in corpus
    return data


@pytest.mark.parametrize(
    ("section", "key", "value", "path"),
    [
        ("train", "totl_steps", 5, "train.totl_steps"),
        ("train", "total_steps", "many", "train.total_steps"),
        ("train", "total_steps", 0, "train.total_steps"),
        ("relora", "rank", 0, "relora.rank"),
        ("relora", "restart_warmup_steps", 20, "relora.restart_warmup_steps"),
        ("relora", "warm_start_steps", 70, "relora.warm_start_steps"),
        ("relora", "reset_ratio", 1.5, "relora.reset_ratio"),
        ("relora", "method", "qlora", "relora.method"),
        ("train", "global_batch_size", 12, "train.global_batch_size"),
        ("model", "name", "llama-7b", "model.name"),
        ("data", "paths", ["/no/such/file.txt"], "data.paths[0]"),
        ("deepspeed", "zero_stage", 4, "deepspeed.zero_stage"),
        ("deepspeed", "zero_stage", 3, "deepspeed.zero_stage"),
        ("optim", "betas", [0.9], "optim.betas"),
        ("scaling", "use_gpu", "yes", "scaling.use_gpu"),
    ],
)
def test_bad_values_name_their_dotted_path(make_trial, tmp_path, section, key, value, path):
    with pytest.raises(ConfigError) as error:
        check_environment(config_from_dict(_with(make_trial, section, key, value)))
    assert error.value.path == path
    assert str(error.value).startswith(path + ":")


def test_stage_3_is_refused_with_the_reason(make_trial, tmp_path):
    with pytest.raises(ConfigError, match="stage 3 is refused: a ReLoRA restart rewrites"):
        config_from_dict(_with(make_trial, "deepspeed", "zero_stage", 3))


def galore_trial(make_trial, **overrides) -> dict:
    return make_trial(relora__method="galore", relora__warm_start_steps=0, **overrides)


def test_galore_runs_on_ddp_and_is_refused_under_zero(make_trial):
    cfg = config_from_dict(galore_trial(make_trial, relora__update_proj_gap=50, relora__proj_type="left"))
    assert cfg.engine == "ddp" and cfg.relora.update_proj_gap == 50  # train.engine auto
    assert config_from_dict(make_trial()).engine == "deepspeed"
    assert config_from_dict(make_trial(train__engine="ddp")).engine == "ddp"  # any method may ask for DDP
    with pytest.raises(ConfigError) as error:
        config_from_dict(galore_trial(make_trial, train__engine="deepspeed"))
    assert error.value.path == "relora.method" and "cannot run under DeepSpeed ZeRO" in error.value.message
    assert "train.engine" in error.value.message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("relora.warm_start_steps", 10),  # GaLore trains full-rank weights from step 0
        ("relora.update_proj_gap", 0),
        ("relora.update_proj_gap", 10**10),
        ("relora.galore_scale", 0.0),
        ("relora.proj_type", "diagonal"),
        ("train.engine", "fsdp"),
    ],
)
def test_galore_settings_are_checked_by_name(make_trial, path, value):
    data = galore_trial(make_trial)
    section, key = path.split(".")
    data[section][key] = value
    with pytest.raises(ConfigError) as error:
        config_from_dict(data)
    assert error.value.path == path


def test_unknown_section_and_search_block(make_trial, tmp_path):
    with pytest.raises(ConfigError, match="^trainer: unknown key"):
        config_from_dict({**make_trial(), "trainer": {}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**make_trial(), "search": {}}))
    with pytest.raises(ConfigError, match="^search:"):
        load_config(path)


# `python -m orchestrator.train` refuses a bad file, or a bad `--set`, with exit code 2 and one
# line naming the key, before it imports Ray: (the key changed in the file, or the overrides; the path named).
FILE_REFUSALS = [
    (("relora", "restart_warmup_steps", 25), "relora.restart_warmup_steps"),
    (("relora", "warm_start_steps", 100), "relora.warm_start_steps"),
    (("train", "bogus", 1), "train.bogus"),
    (("train", "total_steps", "ten"), "train.total_steps"),
]
SET_REFUSALS = [
    (["relora.rank=0"], "relora.rank"),
    (["relora.rnak=8"], "relora.rnak"),
    (["optim.lr=fast"], "optim.lr"),
    (["seed.x=1"], "seed"),
    (["relora.rank"], "--set"),
    (["relora.rank=8", "train.total_steps=10"], "relora.warm_start_steps"),  # 20 >= 10, after both apply
]


@pytest.fixture(scope="module")
def cli_refusals(tmp_path_factory) -> dict[str, dict]:
    """What `python -m orchestrator.train` did with each case, by case id."""
    from conftest import run_cli, trial_dict

    root = tmp_path_factory.mktemp("cli")
    good = root / "good.yaml"
    good.write_text(yaml.safe_dump(trial_dict(root)))
    cases = {}
    for (section, key, value), _ in FILE_REFUSALS:
        bad = root / f"{section}.{key}.yaml"
        trial = trial_dict(root)
        trial[section][key] = value
        bad.write_text(yaml.safe_dump(trial))
        cases[f"file:{section}.{key}"] = [str(bad)]
    for overrides, _ in SET_REFUSALS:
        cases[f"set:{' '.join(overrides)}"] = [str(good), *(arg for item in overrides for arg in ("--set", item))]
    return dict(zip(cases, run_cli("orchestrator.train", list(cases.values())), strict=True))


def assert_refused_before_ray(result: dict, path: str) -> None:
    assert not result["ray_imported"], "Ray was imported before the config was checked"
    assert result["code"] == 2, result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {path}:"), result["stderr"]


@pytest.mark.parametrize(("change", "path"), FILE_REFUSALS, ids=[path for _, path in FILE_REFUSALS])
def test_cli_exits_with_one_line_before_ray_starts(cli_refusals, change, path):
    section, key, _ = change
    assert_refused_before_ray(cli_refusals[f"file:{section}.{key}"], path)


@pytest.mark.parametrize(("overrides", "path"), SET_REFUSALS, ids=[" ".join(o) for o, _ in SET_REFUSALS])
def test_set_overrides_are_checked_like_the_file(cli_refusals, overrides, path):
    assert_refused_before_ray(cli_refusals[f"set:{' '.join(overrides)}"], path)


def test_set_overrides_apply_yaml_values(make_trial, tmp_path):
    config = tmp_path / "good.yaml"
    config.write_text(yaml.safe_dump(make_trial()))
    cfg = load_config(config, overrides=["relora.rank=8", "optim.betas=[0.9, 0.99]", "run.name=from-cli"])
    assert cfg.relora.rank == 8 and cfg.optim.betas == (0.9, 0.99) and cfg.run.name == "from-cli"


@pytest.mark.parametrize(
    ("section", "key", "value", "says"),
    [
        ("relora", "rank", "8", "must be a valid integer, got '8'"),  # strict: YAML's "8" is a string
        ("optim", "lr", True, "must be a valid number, got True"),
        ("train", "totl_steps", 5, "known keys: ['checkpoint_every', 'engine', 'eval_blocks'"),
        ("optim", "betas", [0.9, 0.9, 0.9], "must have 2 items, got [0.9, 0.9, 0.9]"),
        ("scaling", "use_gpu", "yes", "must be a valid boolean or 'auto', got 'yes'"),
        ("relora", "reset_ratio", 1.5, "must lie in [0, 1], got 1.5"),
        ("scaling", "gpus_per_worker", 2, "add workers for more"),
        ("scaling", "gpus_per_worker", 0.5, "a trial of 2 workers needs a whole GPU each"),
    ],
)
def test_messages_give_the_value_and_what_it_must_be(make_trial, section, key, value, says):
    with pytest.raises(ConfigError) as error:
        config_from_dict(_with(make_trial, section, key, value))
    assert says in error.value.message and str(error.value) == f"{error.value.path}: {error.value.message}"


def test_files_are_checked_on_the_driver_only(make_trial, tmp_path):
    """The spec alone never looks at the disk; `load_config` (the driver) does, once."""
    data = _with(make_trial, "data", "paths", [str(tmp_path / "elsewhere.txt")])
    cfg = config_from_dict(data)  # as a Tune actor or a worker on another node would hold it
    assert cfg.data.paths == [str(tmp_path / "elsewhere.txt")]
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"^data.paths\[0\]: no such file"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^data.paths\[0\]: unsupported file type '.csv'"):
        config_from_dict(_with(make_trial, "data", "paths", ["corpus.csv"]))


def test_replace_dotted_types_the_value_and_checks_the_relations(make_trial):
    from orchestrator.config import replace_dotted

    cfg = config_from_dict(make_trial())
    assert replace_dotted(cfg, "optim.betas", [0.9, 0.99]).optim.betas == (0.9, 0.99)
    assert replace_dotted(cfg, "optim.lr", 1).optim.lr == 1.0 and isinstance(
        replace_dotted(cfg, "optim.lr", 1).optim.lr, float
    )
    with pytest.raises(ConfigError, match="^relora.warm_start_steps: must be < train.total_steps"):
        replace_dotted(cfg, "train.total_steps", cfg.relora.warm_start_steps)


def test_the_token_budget_is_checked_against_the_prepared_tokens(make_trial):
    from orchestrator.config import check_token_budget

    cfg = config_from_dict(make_trial())
    assert cfg.token_budget == 70 * 16 * 64
    check_token_budget(cfg.token_budget, train_blocks=70 * 16, data=cfg.data)  # exactly one pass
    with pytest.raises(ConfigError, match=r"^train.total_steps: needs 71,680 training tokens .* holds 71,616"):
        check_token_budget(cfg.token_budget, train_blocks=70 * 16 - 1, data=cfg.data)
    twice = config_from_dict({**make_trial(), "data": {**make_trial()["data"], "epochs": 2}})
    check_token_budget(twice.token_budget, train_blocks=35 * 16, data=twice.data)


def test_the_processes_that_only_pass_a_trial_on_never_import_transformers():
    """Tune's trial actor and Ray Train's controller unpickle the trial config, and start again for
    every trial and every resume: importing transformers' LLaMA there cost each 2-3 s of CPU,
    on the path to the first step. Only the workers, which build the model, import it."""
    import subprocess
    import sys

    modules = "orchestrator.config, orchestrator.sweep, orchestrator.train, orchestrator.worker"
    check = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
    built = "import sys, relora; relora.build_model('llama-tiny'); print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", built], capture_output=True, text=True).stdout.strip() == "True"
