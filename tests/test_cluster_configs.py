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
    assert "mlflow server" in head_commands and "--artifacts-destination s3://" in head_commands
    assert "--backend-store-uri sqlite:" in head_commands
    assert "--dashboard-host=127.0.0.1" in head_commands
    assert "RELORA_STORAGE=s3://" in head_commands and "MLFLOW_TRACKING_URI=" in head_commands


def test_local_cluster_is_valid():
    config = check(load("cluster.local.yaml"))
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == config["available_node_types"]["local.cluster.node"]["max_workers"]
    head_commands = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_commands and "RELORA_STORAGE=/" in head_commands


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
