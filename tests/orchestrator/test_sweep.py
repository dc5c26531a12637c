"""A real sweep end to end: local Ray, 2 CPU workers per trial, ASHA, and MLflow read back
through a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

# One shared warm start per LR. ASHA only compares trials with each other: a far lower LR makes a
# certainly worse trial, which it stops at its first rung whichever of the pair gets there first.
LRS = [0.003, 0.00003]
RANKS = [4, 8]


def test_killed_sweep_resumes_and_records_every_trial_in_mlflow(make_trial, mlflow_server, tmp_path):
    """The sweep end to end, killed mid-run (driver and its local Ray) and run again: each trial
    keeps its one MLflow run and continues from its checkpoint, and the record is whole."""
    spec = make_trial(train__total_steps=60, train__checkpoint_every=10, run__name="e2e", run__max_failures=1)
    spec["search"] = {
        "params": {"optim.lr": {"grid": LRS}, "relora.rank": {"grid": RANKS}},
        "metric": "val_ppl",
        "mode": "min",
        "scheduler": {"type": "asha", "grace_period": 30, "reduction_factor": 2},
        "max_concurrent_trials": 2,
        "resources": {"num_workers": 2},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "orchestrator.sweep", str(path), "--tracking-uri", mlflow_server]
    client = MlflowClient(mlflow_server)

    def runs():
        experiment = client.get_experiment_by_name("e2e")
        return client.search_runs([experiment.experiment_id]) if experiment else []

    def mid_run(child) -> bool:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_ppl")]
        return child.data.tags.get("status") == "running" and bool(steps) and 40 <= steps[-1] < 60

    # Kill the whole sweep while a trial is past its step-40 checkpoint.
    first = subprocess.Popen(
        command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 900
    while not any(mid_run(r) for r in runs() if "tune_trial_id" in r.data.tags):
        assert first.poll() is None and time.time() < deadline, "no trial got past step 40"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = {r.data.tags["tune_trial_id"] for r in runs() if r.data.tags.get("status") == "completed"}
    assert len(done_before) < len(LRS) * len(RANKS)
    time.sleep(5)

    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "resuming the sweep" in out.stdout and "reused from" in out.stdout  # the warm starts too
    assert "best val_ppl" in out.stdout and "open the results" in out.stdout

    parents = [r for r in runs() if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1, "the resumed sweep keeps its parent run"
    parent = parents[0]
    nested = [r for r in runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children = [r for r in nested if "tune_trial_id" in r.data.tags]
    assert len(children) == len(LRS) * len(RANKS), "each trial keeps its one MLflow run"

    # One full-rank warm start per LR, each with a run of its own, shared by the two ranks.
    warm = [r for r in nested if r.data.tags.get("sweep_role") == "warm_start"]
    assert len(warm) == len(LRS)
    for run in warm:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")] == [0, 10, 20]
        sharing = [c for c in children if c.data.tags.get("warm_start_key") == run.data.tags["warm_start_key"]]
        assert sorted(int(c.data.params["relora.rank"]) for c in sharing) == RANKS
        assert {c.data.params["optim.lr"] for c in sharing} == {run.data.params["optim.lr"]}

    # Params: the trial's full resolved config.
    assert sorted((float(c.data.params["optim.lr"]), int(c.data.params["relora.rank"])) for c in children) == [
        (lr, rank) for lr in sorted(LRS) for rank in RANKS
    ]
    for child in children:
        assert child.data.params["deepspeed.zero_stage"] == "2" and child.data.params["train.total_steps"] == "60"

    # val_ppl: one point per eval step, from the end of the shared warm start for as long as the
    # trial ran; none logged twice, across the kill.
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_ppl")]
        assert steps == list(range(20, steps[-1] + 1, 10)), steps
        if child.data.tags["status"] == "completed":
            assert steps[-1] == 60

    statuses = {c.data.tags["status"] for c in children}
    assert statuses == {"early-stopped", "completed"}
    for child in children:
        if child.data.tags["status"] == "early-stopped":
            assert "stopped by ASHA" in child.data.tags["stop_reason"]
            assert client.get_metric_history(child.info.run_id, "val_ppl")[-1].step < 60

    # Unfinished trials continued from their checkpoints rather than starting over.
    resumed = 0
    for child in children:
        if child.data.tags["tune_trial_id"] in done_before or child.data.tags["status"] != "completed":
            continue
        local = mlflow.artifacts.download_artifacts(
            run_id=child.info.run_id,
            artifact_path="history.jsonl",
            dst_path=str(tmp_path / "history" / child.info.run_id),
            tracking_uri=mlflow_server,
        )
        resumed += "resume" in [json.loads(line).get("event") for line in open(local)]
    assert resumed >= 1

    # Every completed trial has a merged checkpoint that downloads and loads.
    completed = [c for c in children if c.data.tags["status"] == "completed"]
    for child in completed:
        local = mlflow.artifacts.download_artifacts(
            run_id=child.info.run_id,
            artifact_path="merged",
            dst_path=str(tmp_path / child.info.run_id),
            tracking_uri=mlflow_server,
        )
        model = AutoModelForCausalLM.from_pretrained(local)
        assert type(model).__name__ == "LlamaForCausalLM"

    # The parent has its plots and the sweep file.
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/val_ppl_curves.png", "plots/val_ppl_vs_relora.rank.png", "plots/val_ppl_vs_optim.lr.png"} <= plots
    assert "sweep.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # The best completed trial is registered.
    versions = client.search_model_versions("name='e2e-best'")
    assert len(versions) == 1
    best = min(completed, key=lambda c: c.data.metrics["best_val_ppl"])
    assert versions[0].run_id == best.info.run_id


def test_a_changed_sweep_is_not_resumed_silently(make_trial, tmp_path, capsys):
    """The same run.name with another spec is refused before any work, naming the key; --fresh starts over."""
    from orchestrator.search import load_sweep
    from orchestrator.sweep import main, write_record

    spec = make_trial(run__name="changed", run__storage_path=str(tmp_path / "runs"))
    spec["search"] = {"params": {"relora.rank": {"grid": [2, 4]}}, "scheduler": {"type": "none"}}
    write_record(load_sweep(spec))  # as a sweep that started with this spec left it
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--dry-run"]) == 0  # unchanged: it resumes
    assert main([str(path), "--dry-run", "--set", "optim.lr=0.01"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("config error: optim.lr: differs from the sweep 'changed'")
    assert main([str(path), "--dry-run", "--set", "optim.lr=0.01", "--fresh"]) == 0


def test_credentials_in_the_storage_uri_are_not_printed(make_trial):
    from orchestrator.search import load_sweep
    from orchestrator.sweep import describe

    spec = make_trial(run__storage_path="s3://AKIAEXAMPLE:wJalrSECRET@bucket/sweeps")
    spec["search"] = {"params": {"relora.rank": {"grid": [2, 4]}}, "scheduler": {"type": "none"}}
    shown = describe(load_sweep(spec))
    assert "s3://***@bucket/sweeps" in shown and "SECRET" not in shown and "AKIA" not in shown


def test_a_budget_larger_than_the_data_is_refused_before_any_work(make_trial, tmp_path, capsys):
    """The data is cached (the session's fixture prepared it): the dry run knows both numbers."""
    from orchestrator.sweep import main

    spec = make_trial(train__total_steps=2000, run__storage_path=str(tmp_path / "runs"))
    spec["search"] = {"params": {"relora.rank": {"grid": [2, 4]}}, "scheduler": {"type": "none"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("config error: train.total_steps: needs 2,048,000 training tokens"), line
    assert "the prepared data holds" in line and "set data.epochs:" in line
    assert main([str(path), "--dry-run", "--set", "data.epochs=100"]) == 0  # repetition asked for
    assert "at most 100 passes over the data" in capsys.readouterr().out


def test_asha_never_judges_a_trial_inside_its_restart_spike(make_trial, tmp_path, monkeypatch, capsys):
    """Two trials that restart at different periods (20: jags at the switch and 40; 25: at the
    switch, 25 and 50), evaluated every 5 steps, ASHA rungs at 25 and 50. At rung 25 both are
    inside a re-warm (the switch at 20; the restart at 25), so each is judged at its first
    evaluation past it: 30 and 35. Both trials share one warm start (restart_every does not shape it)."""
    import ray

    import orchestrator.sweep as sweep
    from orchestrator.config import config_from_dict

    spec = make_trial(
        train__total_steps=60, train__eval_every=5, train__checkpoint_every=20, run__name="fair", run__max_failures=0
    )
    spec["run"]["storage_path"] = str(tmp_path / "runs")
    del spec["scaling"]
    spec["search"] = {
        "params": {"relora.restart_every": {"grid": [20, 25]}},
        "scheduler": {"type": "asha", "grace_period": 25, "reduction_factor": 2},
        "max_concurrent_trials": 2,
        "resources": {"num_workers": 1},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    schedulers, make_scheduler = [], sweep.make_scheduler

    def keep_scheduler(s):  # the sweep's own ASHA, kept to read what it recorded
        schedulers.append(make_scheduler(s))
        return schedulers[-1]

    monkeypatch.setattr(sweep, "make_scheduler", keep_scheduler)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if ray.is_initialized():
        ray.shutdown()
    try:
        assert sweep.main([str(path), "--tracking-uri", tracking]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "rungs at steps [25, 50]" in out and "warm starts: 1 " in out

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("fair")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "tune_trial_id" in r.data.tags]
    assert len({r.data.tags["warm_start_key"] for r in runs}) == 1 and len(runs) == 2
    (bracket,) = schedulers[0]._brackets  # what ASHA recorded: trial -> -val_ppl, per rung
    judged: dict[int, dict[int, int]] = {}
    for run in runs:
        period = int(run.data.params["relora.restart_every"])
        trial = {k: v for k, v in spec.items() if k != "search"}
        cfg = config_from_dict({**trial, "relora": {**trial["relora"], "restart_every": period}})
        curve = {m.value: m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")}
        trial_id = run.data.tags["tune_trial_id"]
        judged[period] = {rung: curve[-value] for rung, recorded in bracket._rungs if (value := recorded.get(trial_id))}
        for rung, step in judged[period].items():
            assert step >= rung and not cfg.relora.rewarming_after(step), (period, rung, step)
    print("judged at (period: {rung: step}):", judged)
    assert judged[20][25] == 30 and judged[25][25] == 35, judged
