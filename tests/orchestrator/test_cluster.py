"""Sweeps on a real multi-node Ray cluster, on this one machine.

A head and two worker nodes, each a raylet of its own started with `ray start` as
cluster.yaml starts them, with its own resources: the head runs the MLflow server and the
sweep driver (a `ray job submit` entrypoint, as in the README); the Train workers need the
`trainer` resource that only the two worker nodes have, as GPU workers need GPU nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import free_port, start_mlflow_server, trial_dict
from mlflow.tracking import MlflowClient

from orchestrator.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]
WORKER_NODES = ("node_b", "node_c")


@dataclass
class Cluster:
    dashboard: str  # the address `ray job submit` talks to
    mlflow: str
    storage: Path
    env: dict
    node_ids: dict[str, str]  # node_b / node_c -> Ray node id
    node_manager_ports: dict[str, int]

    def ray(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(Path(sys.executable).parent / "ray"), *args], env=self.env, text=True, capture_output=True, **kwargs
        )

    def submit(self, spec: Path, **kwargs):
        """The README's command: the sweep as a Ray job, this checkout as its working dir."""
        command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.dashboard]
        command += ["--working-dir", ".", "--", "python", "-m", "orchestrator.sweep", str(spec)]
        return subprocess.Popen(command, cwd=REPO, env=self.env, text=True, **kwargs)

    def kill_node(self, name: str) -> None:
        """What losing a machine does to Ray: its raylet is gone, and its workers with it."""
        port = f"--node_manager_port={self.node_manager_ports[name]}"
        (raylet,) = [p for p in psutil.process_iter(["name", "cmdline"]) if port in (p.info["cmdline"] or [])]
        for child in raylet.children(recursive=True):
            child.kill()
        raylet.send_signal(signal.SIGKILL)


def wait_for_job_agent(dashboard: str, timeout_s: float = 90) -> None:
    """Until the head's job agent takes a job: on a loaded machine it registers seconds after the
    nodes are alive, and a submit before that is refused ("No available agent")."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(dashboard), time.time() + timeout_s
    while True:
        try:
            client.submit_job(entrypoint="true")
            return
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_cache):
    import ray

    if ray.is_initialized():  # two Ray instances on one machine confuse its placement-group cleaner
        ray.shutdown()
    root = tmp_path_factory.mktemp("cluster")
    with start_mlflow_server(root / "mlflow") as mlflow_uri:
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO),
            # What cluster.yaml exports on the head before `ray start`: the sweep inherits them.
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "RELORA_STORAGE": str(root / "storage"),
            # As on a fresh `ray up` cluster: no token auth (a token left in ~/.ray by a local
            # ray.init would otherwise switch the head to token mode and lock the nodes out).
            "RAY_AUTH_MODE": "disabled",
            # Notice a dead node in ~3 s rather than ~30 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000",
        }
        gcs_port, dashboard_port = free_port(), free_port()
        ray_bin = str(Path(sys.executable).parent / "ray")
        common = ["--disable-usage-stats"]
        # Each node its own temp dir, as each machine has its own disk: nodes sharing one would
        # also share (and garbage-collect) each other's copies of the job's working dir.
        temp_dirs = {name: tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp") for name in ("head", *WORKER_NODES)}
        head = [ray_bin, "start", "--head", f"--port={gcs_port}", "--num-cpus=2", "--dashboard-host=127.0.0.1"]
        head += [f"--temp-dir={temp_dirs['head']}"]
        head += [f"--dashboard-port={dashboard_port}", "--include-dashboard=true"]
        subprocess.run(head + common, env=env, check=True, capture_output=True)
        ports = {}
        try:
            for name in WORKER_NODES:
                ports[name] = free_port()
                worker = [ray_bin, "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2"]
                worker += [f"--resources={json.dumps({'trainer': 1, name: 1})}", f"--node-manager-port={ports[name]}"]
                worker += [f"--temp-dir={temp_dirs[name]}"]
                subprocess.run(worker + common, env=env, check=True, capture_output=True)
            from ray.util.state import list_nodes

            dashboard = f"http://127.0.0.1:{dashboard_port}"
            deadline = time.time() + 60
            while len(nodes := list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])) < 3:
                assert time.time() < deadline, f"only {len(nodes)} nodes joined"
                time.sleep(1)
            node_ids = {n: next(x.node_id for x in nodes if n in x.resources_total) for n in WORKER_NODES}
            wait_for_job_agent(dashboard)
            yield Cluster(dashboard, mlflow_uri, root / "storage", env, node_ids, ports)
        finally:
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
            for path in temp_dirs.values():
                shutil.rmtree(path, ignore_errors=True)


def sweep_spec(tmp_path: Path, data_cache: Path, name: str, total_steps: int, ranks: list[int]) -> Path:
    """Trials of one Train worker each, which only a worker node can host."""
    spec = trial_dict(tmp_path, data_cache)
    del spec["scaling"]  # a sweep sets its workers in search.resources
    spec["run"] = {"name": name, "max_failures": 2}  # storage: $RELORA_STORAGE, set on the head
    spec["relora"].update(warm_start_steps=20, restart_every=20)
    spec["train"].update(total_steps=total_steps, checkpoint_every=10, eval_every=10)
    spec["search"] = {
        "params": {"relora.rank": {"grid": ranks}},
        "scheduler": {"type": "none"},
        "max_concurrent_trials": 2,
        "resources": {"num_workers": 1, "resources_per_worker": {"trainer": 1}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trial_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id]) if "tune_trial_id" in r.data.tags]


def expected_merges(spec: Path) -> list[int]:
    raw = yaml.safe_load(spec.read_text())
    raw.pop("search")
    cfg = config_from_dict(raw)
    return cfg.relora.restart_steps(cfg.train.total_steps)


def merges_in_history(client: MlflowClient, run_id: str, tmp_path: Path) -> list[int]:
    local = client.download_artifacts(run_id, "history.jsonl", str(tmp_path))
    events = [json.loads(line) for line in Path(local).read_text().splitlines()]
    return [e["at_step"] for e in events if e.get("event") == "restart"]


@dataclass
class NodeLossSweep:
    """One sweep of two trials, one per worker node, with the node of one of them lost mid-run."""

    spec: Path
    returncode: int  # `ray job submit`'s
    output: str  # what it printed
    killed_run_id: str
    first_node: str  # the node the killed trial ran on until then
    reached: int  # the last step its first attempt reported


def checkpointed_steps(trials_dir: Path) -> dict[str, int]:
    """Trial id -> the last step it has checkpointed, read from the shared storage: the workers
    write there first, so this sees a trial's progress at once (its MLflow curves come seconds
    later, through the driver's recorder)."""
    steps: dict[str, int] = {}
    for meta in trials_dir.glob("*/checkpoint_*/meta.json"):
        try:
            step = json.loads(meta.read_text())["step"]
        except (OSError, ValueError, KeyError):  # still being written
            continue
        trial_id = meta.parent.parent.name
        steps[trial_id] = max(step, steps.get(trial_id, 0))
    return steps


@pytest.fixture(scope="module")
def node_loss_sweep(cluster, data_cache, tmp_path_factory) -> NodeLossSweep:
    """The README's `ray job submit` of a two-trial sweep, one trial per worker node; once one
    trial has written its step-50 checkpoint (of 80 steps), its node is taken away: killed the way
    a machine is lost. Both tests below read this one sweep (it takes about 2 minutes)."""
    tmp_path = tmp_path_factory.mktemp("node-loss")
    spec = sweep_spec(tmp_path, data_cache, "node-loss", total_steps=80, ranks=[2, 4])
    log = (tmp_path / "job.log").open("w")
    job = cluster.submit(spec, stdout=log, stderr=subprocess.STDOUT)
    client = MlflowClient(cluster.mlflow)

    def train_steps(run) -> list[int]:
        return [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]

    deadline = time.time() + 600
    while True:
        assert job.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-6000:]
        past = [trial for trial, step in checkpointed_steps(cluster.storage / "node-loss-trials").items() if step >= 50]
        runs = trial_runs(client, "node-loss")
        placed = {r.data.tags["tune_trial_id"]: r for r in runs if "ray_nodes" in r.data.tags}
        if past and past[0] in placed:
            break
        time.sleep(0.2)
    run = placed[past[0]]
    reached = max(train_steps(run), default=0)
    (first_node,) = run.data.tags["ray_nodes"].split(",")
    killed = next(name for name, node_id in cluster.node_ids.items() if node_id == first_node)
    cluster.kill_node(killed)

    # The steps the lost attempt got to report: the run logs each step once, so until the trial
    # resumes, every step in its history is one the first attempt trained (reports still in
    # flight when the node died land here too, which is why this is read after the kill).
    while job.poll() is None and time.time() < deadline:
        history = train_steps(run)
        if "resumes" in client.get_run(run.info.run_id).data.tags:
            break
        reached = max([reached, *history])
        time.sleep(0.2)

    job.wait(timeout=900)
    log.close()
    return NodeLossSweep(spec, job.returncode, (tmp_path / "job.log").read_text(), run.info.run_id, first_node, reached)


def test_job_submitted_sweep_spreads_trials_over_nodes(cluster, node_loss_sweep, tmp_path):
    sweep = node_loss_sweep
    assert sweep.returncode == 0 and "succeeded" in sweep.output, sweep.output[-6000:]
    # The README's other job commands: the job is listed, and its log holds the summary.
    (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' succeeded", sweep.output))
    assert job_id in cluster.ray("job", "list", "--address", cluster.dashboard).stdout
    assert "best trial" in cluster.ray("job", "logs", job_id, "--address", cluster.dashboard).stdout

    client = MlflowClient(cluster.mlflow)
    runs = trial_runs(client, "node-loss")
    assert len(runs) == 2
    assert {r.data.tags["status"] for r in runs} == {"completed"}
    # The two trials ran at once, one on each worker node (the lost one's later attempt on the
    # node the other left free).
    (survivor,) = [r for r in runs if r.info.run_id != sweep.killed_run_id]
    (survivor_node,) = survivor.data.tags["ray_nodes"].split(",")
    assert {survivor_node, sweep.first_node} == set(cluster.node_ids.values())
    for run in runs:
        logged = client.get_logged_model(run.data.tags["logged_model_id"])
        assert {a.path for a in client.list_logged_model_artifacts(logged.model_id, "model")} >= {
            "model/model.safetensors"
        }
        assert merges_in_history(client, run.info.run_id, tmp_path / run.info.run_id) == expected_merges(sweep.spec)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"

    # Everything the trials wrote is on the shared storage path: data, warm start, checkpoints.
    assert list(cluster.storage.glob("data/blocks-*/meta.json"))
    assert list(cluster.storage.glob("warm-starts/*.json"))
    assert list(cluster.storage.glob("node-loss-trials/*/checkpoint_*/merged/model/model.safetensors"))


def test_a_lost_node_costs_only_the_steps_since_the_last_checkpoint(cluster, node_loss_sweep, tmp_path):
    sweep = node_loss_sweep
    client = MlflowClient(cluster.mlflow)
    run = client.get_run(sweep.killed_run_id)  # one MLflow run for the trial, restart and all
    tags = run.data.tags
    assert tags["status"] == "completed"
    assert tags["resumes"] == "1"
    resumed_at = int(tags["resumed_at_steps"])
    # It resumed from the last checkpoint (every 10 steps) before what it had reached, or the one
    # before if the node died while that checkpoint's report was on its way.
    assert resumed_at % 10 == 0 and 40 <= resumed_at <= sweep.reached < resumed_at + 20, (resumed_at, sweep.reached)
    assert set(tags["ray_nodes"].split(",")) == set(cluster.node_ids.values())  # it moved to the other node
    # The same merges as an uninterrupted run: each restart step once, none skipped or repeated.
    assert merges_in_history(client, run.info.run_id, tmp_path) == expected_merges(sweep.spec) == [40, 60]
    assert tags["merges"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")]
    assert steps == sorted(set(steps)) and steps[-1] == 80
