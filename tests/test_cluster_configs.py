"""cluster.yaml and cluster.local.yaml, checked the way `ray up` checks them."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def check(config: dict) -> dict:
    """What `ray up` does before it touches a cloud: fill the defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_cluster_is_valid_and_keeps_ports_private():
    config = check(load("cluster.yaml"))
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = [t for t, n in config["available_node_types"].items() if n["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(config["available_node_types"][t]["max_workers"] > 0 for t in gpu_types)
    assert "ray-ml" not in config["docker"]["image"] and config["docker"]["image"].startswith("rayproject/ray:")
    assert any("pip install" in c and "/home/ray/relora" in c for c in config["setup_commands"])
    opened = {p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]}
    assert opened == {22}, "only SSH is open: dashboard and MLflow go through SSH tunnels"
    head_commands = " ".join(config["head_start_ray_commands"])
    assert "orchestrator.mlflow_server start /home/ray/mlflow --artifacts-destination s3://" in head_commands
    assert "--dashboard-host=127.0.0.1" in head_commands
    assert "RELORA_STORAGE=s3://" in head_commands and "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in head_commands
    # Token authentication in every process of the cluster, with the laptop's token on every node.
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_mlflow_is_started_and_stopped_by_its_pid_never_a_pattern(name):
    config = load(name)
    commands = config["head_start_ray_commands"]
    text = " ".join(commands)
    assert "pkill" not in text and "killall" not in text, "a pattern can match our own shell or others' servers"
    assert "mlflow server" not in text, "the server runs under orchestrator.mlflow_server, which keeps its pid"
    stop = next(i for i, c in enumerate(commands) if "orchestrator.mlflow_server stop" in c)
    ray_start = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    mlflow_start = next(i for i, c in enumerate(commands) if "orchestrator.mlflow_server start" in c)
    # Started after Ray, whose GCS it watches (it stops when `ray down` stops Ray), on 127.0.0.1 only.
    assert stop < ray_start < mlflow_start
    assert "--host" not in commands[mlflow_start] or "--host 127.0.0.1" in commands[mlflow_start]
    assert "0.0.0.0" not in text


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_values_to_edit_are_marked(name):
    lines = (ROOT / name).read_text().splitlines()
    placeholders = ["my-relora-bucket", "/mnt/shared", "10.0.0.", "123456789012", "0.0.0.0/0", "--num-cpus"]
    if name == "cluster.local.yaml":  # on AWS the image decides the user and Ray makes the key
        placeholders += ["ssh_user", "ssh_private_key", "min_workers", "max_workers", "pip install"]
    for placeholder in placeholders:
        for line in lines:
            if placeholder in line and not line.lstrip().startswith("#"):
                assert "# EDIT" in line, f"{name}: {line.strip()}"


def test_local_cluster_is_valid():
    config = check(load("cluster.local.yaml"))
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == config["available_node_types"]["local.cluster.node"]["max_workers"]
    setup = " ".join(config["setup_commands"])
    # One interpreter on every machine, first on PATH in every shell Ray opens, with token auth on.
    assert "export PATH=$HOME/relora-venv/bin:$PATH RAY_AUTH_MODE=token" in setup
    assert "RELORA_STORAGE=/" in setup and "echo '. ~/relora.env' >> ~/.bashrc" in setup
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert ". ~/relora.env; " in command, "ray start sees the cluster's PATH, whatever .bashrc did after"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_a_node_type_without_resources_is_refused():
    config = load("cluster.yaml")
    del config["available_node_types"]["gpu_a10g_x4"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        check(config)


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_misspelled_or_mistyped_keys_are_refused(name):
    config = load(name)
    config["idle_timeout_minutes"] = "ten"  # a string where Ray wants a number
    with pytest.raises(jsonschema.ValidationError):
        check(config)
    config = load(name)
    config["head_start_commands"] = ["ray start --head"]  # not a key Ray knows
    with pytest.raises(jsonschema.ValidationError, match="head_start_commands"):
        check(config)


def test_local_cluster_without_worker_addresses_is_refused():
    config = load("cluster.local.yaml")
    del config["provider"]["worker_ips"]
    with pytest.raises((SystemExit, Exception), match="worker_ips"):
        check(config)


def test_only_the_head_offers_the_trial_driver_resource():
    from orchestrator.sweep import TRIAL_DRIVER_RESOURCE, trial_actor_resources

    aws = check(load("cluster.yaml"))
    for name, node_type in aws["available_node_types"].items():
        offered = node_type["resources"].get(TRIAL_DRIVER_RESOURCE, 0)
        assert (offered >= 100) if name == aws["head_node_type"] else offered == 0, name
    local = load("cluster.local.yaml")
    head = " ".join(c for c in local["head_start_ray_commands"] if "ray start" in c)
    assert f"""--resources='{{"{TRIAL_DRIVER_RESOURCE}":1000}}'""" in head
    assert TRIAL_DRIVER_RESOURCE not in " ".join(local["worker_start_ray_commands"])
    # A trial's Tune actor asks for it wherever the cluster offers it, and only there.
    assert trial_actor_resources({"CPU": 8, TRIAL_DRIVER_RESOURCE: 1000}) == {"cpu": 1, TRIAL_DRIVER_RESOURCE: 1}
    assert trial_actor_resources({"CPU": 8}) == {"cpu": 1}


def test_secrets_stay_off_the_nodes():
    """Both cluster files sync the checkout with .gitignore as the filter: it must keep keys out."""
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*"} <= set(ignored)
    for name in ("cluster.yaml", "cluster.local.yaml"):
        config = load(name)
        assert config["rsync_filter"] == [".gitignore"], name


def test_a_trial_that_fits_the_autoscaled_cluster_is_accepted_before_its_gpu_nodes_start(tmp_path, monkeypatch):
    """On a fresh `ray up cluster.yaml` only the head runs; the autoscaler's config (what `ray up`
    leaves on the head) says what it may add: 8 x 4 + 2 x 8 = 48 GPUs."""
    from orchestrator.config import ConfigError, ScalingConfig
    from orchestrator.train import check_cluster_resources, cluster_capacity

    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump(check(load("cluster.yaml"))))
    head_only = {"CPU": 8.0, "relora_trial_driver": 1000.0}
    capacity = cluster_capacity(head_only, str(bootstrap))
    assert capacity["GPU"] == 48 and capacity["CPU"] == 8 + 8 * 48 + 2 * 192
    rank_sweep = ScalingConfig(num_workers=8, use_gpu=True, gpus_per_worker=1.0, cpus_per_worker=8)
    monkeypatch.setattr("orchestrator.train.AUTOSCALING_CONFIG", str(bootstrap))
    check_cluster_resources(rank_sweep, head_only)  # no GPU node yet, and still placeable
    too_big = ScalingConfig(num_workers=64, use_gpu=True, gpus_per_worker=1.0, cpus_per_worker=1)
    with pytest.raises(ConfigError, match="GPU"):
        check_cluster_resources(too_big, head_only)
    assert cluster_capacity(head_only, str(tmp_path / "none.yaml")) == head_only  # no autoscaler: what is there
