"""One trial end to end: a real Ray Train TorchTrainer, 2 CPU workers, DeepSpeed ZeRO, real text."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.config import config_from_dict
from orchestrator.data import load_blocks, prepare_data
from orchestrator.train import make_trainer, read_history


def run_trial(trial: dict, *, name: str = "trial", kill_after_checkpoint: int | None = None):
    """Fit one trial; with ``kill_after_checkpoint``, SIGKILL one of its workers from outside
    (by pid, from this process) once its checkpoint of that step is on storage."""
    cfg = config_from_dict(trial)
    data = prepare_data(cfg.data)
    killed: list[int] = []
    if kill_after_checkpoint is not None:
        run_dir = Path(cfg.run.storage_path) / name
        threading.Thread(target=kill_a_worker, args=(run_dir, kill_after_checkpoint, killed), daemon=True).start()
    try:
        result = make_trainer(cfg, data, name=name).fit()
    except Exception as error:  # Ray Train raises when the worker group runs out of retries
        return cfg, data, None, error, killed
    return cfg, data, result, result.error, killed


def checkpointed_steps(run_dir: Path) -> list[int]:
    steps = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            steps.append(json.loads(meta.read_text())["step"])
        except (OSError, ValueError):  # still being written
            pass
    return steps


def kill_a_worker(run_dir: Path, after_step: int, killed: list[int], timeout_s: float = 600) -> None:
    """What a lost worker looks like to Ray Train: its process is gone, killed by a signal."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(step >= after_step for step in checkpointed_steps(run_dir)):
            # This test's own Ray (started by this process) only: its workers descend from us.
            workers = [
                p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())
            ]
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.05)


def events(history: list[dict], kind: str) -> list[dict]:
    return [h for h in history if h.get("event") == kind]


def merged_val_loss(path: str, data, blocks: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = load_blocks(data.path)["validation"][:blocks]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def zero2_run(local_ray, tmp_path_factory, data_cache):
    from conftest import trial_dict

    return run_trial(trial_dict(tmp_path_factory.mktemp("zero2"), data_cache))


@pytest.fixture(scope="module")
def bf16_run(local_ray, tmp_path_factory, data_cache):
    """The same trial in bf16 (DeepSpeed's CPU accelerator runs ZeRO-2 bf16 over gloo)."""
    from conftest import trial_dict

    trial = trial_dict(tmp_path_factory.mktemp("bf16"), data_cache, deepspeed__precision="bf16")
    return run_trial(trial)


def check_recipe(cfg, data, result, error, killed=()):
    assert error is None, error
    history = read_history(result.checkpoint.path)
    start, done = history[0], history[-1]
    assert start["event"] == "start" and done["event"] == "done"

    # Warm start, then the switch to low rank, then two restarts at the configured steps.
    assert [e["at_step"] for e in events(history, "switch")] == [20]
    restarts = events(history, "restart")
    assert [e["at_step"] for e in restarts] == [40, 60]
    assert all(e["merged_layers"] == 14 for e in restarts)
    assert all(abs(e["reset_fraction"] - 0.99) <= 0.02 for e in restarts), "two optimizer resets of 99%"
    assert all(e["weights_in_sync"] for e in restarts), "ranks must hold identical weights after a merge"
    # Each merge added the whole update to the stored weights, bf16 ones included (compensated).
    assert all(0 <= e["merge_lost_share"] < 0.01 for e in restarts), [e["merge_lost_share"] for e in restarts]

    # The LR drops to zero at each restart, after being positive just before it.
    lr = {h["step"] - 1: h["lr"] for h in history if "lr" in h}  # the LR of step (n - 1)
    for e in restarts:
        before = max(step for step in lr if step < e["at_step"])
        assert lr[e["at_step"]] == 0.0 and lr[before] > 0.0

    # The restarts took the update past the adapter rank, measured against W at the switch,
    # which is written once, into the run's folder, and into no checkpoint.
    assert restarts[-1]["update_rank_max"] > cfg.relora.rank
    run_dir = Path(result.checkpoint.path).parent
    assert (run_dir / "start_weights.safetensors").is_file()
    assert list(run_dir.glob(f"checkpoint_*/{cfg.engine}")) and not list(run_dir.glob("checkpoint_*/start_weights*"))

    # The last step's metrics ride on the done report and nowhere else: a scheduler that stops
    # the trial at its last report cannot cut it off before the merged checkpoint.
    last_step = [h for h in history if h["step"] == cfg.train.total_steps and "train_loss" in h]
    assert last_step == [done] and done["val_ppl"] == done["final_val_ppl"]

    # Validation perplexity fell well below where it started (to under a quarter: about 1/5
    # on tinyshakespeare, 1/4.8 on the built-in corpus, ~1 for a model that learns nothing).
    assert done["final_val_ppl"] < 0.25 * start["val_ppl"]

    # One worker's memory in the low-rank phase, on either engine: weights, the adapters' gradients
    # (ZeRO-2 holds them reduced, in partitions) and optimizer state, each counted.
    memory = {k: v for k, v in done.items() if k.startswith("memory_")}
    assert memory["memory_params_bytes"] > 0 and memory["memory_grads_bytes"] > 0, memory
    assert memory["memory_optimizer_bytes"] > memory["memory_grads_bytes"], "two moments a trained weight"
    parts = ("memory_params_bytes", "memory_grads_bytes", "memory_optimizer_bytes")
    assert memory["memory_total_bytes"] == sum(memory[k] for k in parts)

    # The merged checkpoint's `model/` is a plain HF model that reproduces the final validation loss.
    merged = f"{result.checkpoint.path}/merged/model"
    reproduced = merged_val_loss(merged, data, cfg.train.eval_blocks)
    assert abs(reproduced - done["final_val_loss"]) <= 0.01 * done["final_val_loss"]
    return history


def test_zero2_trial_runs_the_full_recipe(zero2_run):
    check_recipe(*zero2_run)


def test_zero1_trial_runs_the_full_recipe(local_ray, make_trial, tmp_path):
    # Checkpoints every 15 steps, reports every 10: steps 15 and 45 checkpoint without a log step.
    trial = make_trial(
        deepspeed__zero_stage=1, train__checkpoint_every=15, train__log_every=10, run__checkpoints_to_keep=10
    )
    check_recipe(*run_trial(trial))
    assert sorted(checkpointed_steps(tmp_path / "runs" / "trial")) == [15, 30, 45, 60]


def _losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["train_loss"] for h in history if "train_loss" in h}


def assert_same_run(history: list[dict], reference: list[dict]) -> None:
    resumes = events(history, "resume")
    # From the last checkpoint Ray Train had recorded when the worker died (30 or 40 here, as
    # the kill races the report of the step-40 one): never from the start.
    assert len(resumes) == 1 and 20 <= resumes[0]["from_step"] < 70, "it must resume from a checkpoint, not restart"
    steps = [h["step"] for h in history if "train_loss" in h]
    assert len(steps) == len(set(steps)), "a resumed run must not repeat reports"
    ours, theirs = _losses(history), _losses(reference)
    assert ours.keys() == theirs.keys()
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-4), f"loss differs at step {step}"
    assert [e["at_step"] for e in events(history, "restart")] == [40, 60], "merges are not double-counted"
    assert events(history, "restart")[-1]["restarts"] == 2


def test_killed_run_resumes_where_it_stopped(zero2_run, local_ray, make_trial, tmp_path):
    reference = read_history(zero2_run[2].checkpoint.path)
    trial = make_trial()
    # A worker is killed after the checkpoint at step 40; no retries: the run fails.
    *_, error, killed = run_trial(trial, name="killed", kill_after_checkpoint=40)
    assert error is not None and len(killed) == 1
    # Running it again resumes from its last checkpoint and finishes the same run.
    cfg, data, result, error, _ = run_trial(trial, name="killed")
    assert error is None, error
    history = read_history(result.checkpoint.path)
    assert_same_run(history, reference)
    assert history[-1]["final_val_loss"] == pytest.approx(reference[-1]["final_val_loss"], abs=1e-4)


def test_one_warm_start_serves_every_restart_period_exactly(zero2_run, local_ray, make_trial, tmp_path):
    """Trials that differ only in ``restart_every`` share one warm start, and a trial started from
    it is, loss for loss, the run that trained its own. The warm start is trained here from the
    *other* trial's config (a restart every 10 steps, half its 20 full-rank steps): its LR must
    follow the plain envelope, or its losses would not be the reference run's first 20."""
    from orchestrator.warmstart import fit_warm_start, warm_start_key

    cfg, data, result, _, _ = zero2_run  # restart every 20: the switch at 20, restarts at 40 and 60
    reference = _losses(read_history(result.checkpoint.path))
    other = config_from_dict(make_trial(relora__restart_every=10, relora__restart_warmup_steps=3))
    assert other.relora.restart_steps(70) == [30, 40, 50, 60] and cfg.relora.restart_steps(70) == [40, 60]
    assert warm_start_key(other, data) == warm_start_key(cfg, data)

    checkpoint = fit_warm_start(other, data, "shared", str(tmp_path / "runs"))
    warm = _losses(read_history(checkpoint))
    assert sorted(warm) == [s for s in sorted(reference) if s <= 20]
    assert warm == {s: reference[s] for s in warm}, "the shared warm start is the reference run's own"

    shared = make_trainer(cfg, data, name="from-shared", storage_path=str(tmp_path / "runs"), warm_start=checkpoint)
    history = read_history(shared.fit().checkpoint.path)
    after = _losses(history)
    assert sorted(after) == [s for s in sorted(reference) if s > 20]
    assert after == {s: reference[s] for s in after}, "a trial from the shared warm start is the unshared run"
    assert [e["at_step"] for e in events(history, "restart")] == [40, 60]


def test_bf16_trial_runs_the_full_recipe(bf16_run):
    history = check_recipe(*bf16_run)
    # It really ran in bf16: the merges went into bf16 weights (and check_recipe found them exact).
    assert events(history, "switch")[0]["weight_dtype"] == "bfloat16"


def test_lost_bf16_worker_is_recovered_by_ray_train(bf16_run, local_ray, make_trial, tmp_path):
    """Exact resume in bf16 at the fp32 tolerance (1e-4 on every loss): the checkpoint holds the
    bf16 weights, their merge residuals, DeepSpeed's fp32 masters and Adam moments, and the
    steps replay the same bf16 arithmetic, so nothing is left to differ."""
    reference = read_history(bf16_run[2].checkpoint.path)
    trial = make_trial(run__max_failures=1, deepspeed__precision="bf16")
    cfg, data, result, error, killed = run_trial(trial, kill_after_checkpoint=40)
    assert error is None, error
    assert len(killed) == 1, "a worker was killed once"
    assert_same_run(read_history(result.checkpoint.path), reference)


# GaLore on the DDP engine: 50 steps, a new projection every 15 (at 15, 30 and 45), checkpoints
# every 10; a worker killed after the step-20 checkpoint resumes across the projections after it.
GALORE = {
    "relora__method": "galore",
    "relora__warm_start_steps": 0,
    "relora__rank": 8,
    "relora__update_proj_gap": 15,
    "optim__lr": 0.01,
    "train__total_steps": 50,
    "train__checkpoint_every": 10,
}


@pytest.fixture(scope="module")
def galore_run(local_ray, tmp_path_factory, data_cache):
    from conftest import trial_dict

    return run_trial(trial_dict(tmp_path_factory.mktemp("galore"), data_cache, **GALORE))


def test_galore_trains_on_ddp_with_rank_sized_optimizer_state(galore_run):
    """GaLore's trial: DDP checkpoints, a falling loss, its memory measured beside full rank's
    formula, and a merged Hugging Face model (GaLore has nothing to merge: the weights as trained)."""
    cfg, data, result, error, _ = galore_run
    assert error is None, error
    assert cfg.engine == "ddp"
    history = read_history(result.checkpoint.path)
    start, done = history[0], history[-1]
    assert not events(history, "switch") and not events(history, "restart")
    assert done["final_val_ppl"] < 0.4 * start["val_ppl"]
    run_dir = Path(result.checkpoint.path).parent
    assert list(run_dir.glob("checkpoint_*/ddp/state_tensors.safetensors")), "the DDP engine's checkpoints"
    assert not list(run_dir.glob("checkpoint_*/deepspeed")) and not list(run_dir.glob("checkpoint_*/*/*.pt"))

    # One worker's memory, measured in the second step: every weight and gradient in fp32, and
    # Adam's two moments (8 bytes a parameter) for all but the target layers, whose state is
    # a rank-8 projection: far less than their 8 bytes a weight.
    merged = f"{result.checkpoint.path}/merged/model"
    named = dict(AutoModelForCausalLM.from_pretrained(merged).named_parameters())
    params = sum(p.numel() for p in named.values())
    projected = sum(p.numel() for name, p in named.items() if name.endswith("_proj.weight"))
    memory = next(h for h in history if "memory_total_bytes" in h)
    assert memory["step"] <= cfg.train.log_every  # the first report after the second step
    assert memory["memory_grads_bytes"] == pytest.approx(4 * params, rel=0.01)  # DDP's buckets: one copy
    assert memory["memory_params_bytes"] >= 4 * params
    plain = 8 * (params - projected)
    assert plain < memory["memory_optimizer_bytes"] < plain + 8 * projected / 2
    assert done["memory_optimizer_bytes"] == memory["memory_optimizer_bytes"] and done["tokens_per_s"] > 0

    reproduced = merged_val_loss(merged, data, cfg.train.eval_blocks)
    assert abs(reproduced - done["final_val_loss"]) <= 0.01 * done["final_val_loss"]


def test_lost_galore_worker_resumes_exactly(galore_run, local_ray, make_trial, tmp_path):
    """The DDP checkpoint holds GaLore's projections with its moments: the resumed run is the
    uninterrupted one, loss for loss, through the projection updates after the resume."""
    reference = read_history(galore_run[2].checkpoint.path)
    cfg, data, result, error, killed = run_trial(make_trial(run__max_failures=1, **GALORE), kill_after_checkpoint=20)
    assert error is None, error
    assert len(killed) == 1
    history = read_history(result.checkpoint.path)
    resumes = events(history, "resume")
    # From the last checkpoint Ray Train had recorded when the worker died (10 or 20: the kill
    # races the report of the step-20 one); new projections follow at 30 and 45 either way.
    assert len(resumes) == 1 and resumes[0]["from_step"] in (10, 20), resumes
    ours, theirs = _losses(history), _losses(reference)
    assert ours.keys() == theirs.keys()
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-4), f"loss differs at step {step}"


def test_relora_runs_the_full_recipe_on_ddp(local_ray, make_trial):
    """`train.engine: ddp` for ReLoRA itself: the restarts reset a plain torch AdamW's moments."""
    check_recipe(*run_trial(make_trial(train__engine="ddp")))


def test_a_file_trial_runs_after_its_source_file_is_gone(local_ray, make_trial, shakespeare, tmp_path):
    """What a worker node without the driver's files sees (this test's nodes share one disk,
    so the file is removed instead): the trial reads the prepared shards, never the source."""
    import shutil

    corpus = tmp_path / "corpus.txt"
    shutil.copy(shakespeare, corpus)
    trial = make_trial(
        data__source="file",
        data__paths=[str(corpus)],
        data__cache_dir=str(tmp_path / "cache"),
        relora__method="full",
        scaling__num_workers=1,  # what one worker reads, every worker reads
        train__total_steps=10,
        train__eval_every=10,
        train__checkpoint_every=10,
        run__storage_path=str(tmp_path / "runs"),
    )
    cfg = config_from_dict(trial)
    data = prepare_data(cfg.data, str(tmp_path / "storage"))
    corpus.unlink()
    result = make_trainer(cfg, data, name="source-gone").fit()
    assert result.error is None and math.isfinite(result.metrics["final_val_ppl"])


def test_reports_are_taken_without_stalling_unless_the_user_tuned_it(make_trial, monkeypatch):
    """Ray Train's default 2 s poll made every report wait up to 2 s: make_trainer shortens it,
    and leaves a value the user set alone. Ray hands the variable on to its controller."""
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR, get_env_vars_to_propagate

    from orchestrator.data import PreparedData
    from orchestrator.train import REPORT_POLL_ENV

    assert REPORT_POLL_ENV == HEALTH_CHECK_INTERVAL_S_ENV_VAR
    cfg = config_from_dict(make_trial(scaling__use_gpu=False))
    data = PreparedData(
        "unused", "unused", "0", vocab_size=8, seq_len=64, train_blocks=1, validation_blocks=1, cache_hit=True
    )
    monkeypatch.delenv(REPORT_POLL_ENV, raising=False)
    make_trainer(cfg, data)
    assert float(get_env_vars_to_propagate()[REPORT_POLL_ENV]) <= 0.5
    monkeypatch.setenv(REPORT_POLL_ENV, "3")
    make_trainer(cfg, data)
    assert get_env_vars_to_propagate()[REPORT_POLL_ENV] == "3"


def test_a_single_trial_is_recorded_in_mlflow_as_a_sweep_records_a_trial(make_trial, data_cache, tmp_path, monkeypatch):
    """`python -m orchestrator.train --tracking-uri`: a run with every config key resolved (and a
    `config.yaml` that the same command takes as it is), the curves, its status, per-layer update
    ranks as a table and a heatmap, and the merged model, logged once as a `transformers` model that
    generates text through MLflow's own API."""
    import mlflow
    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from orchestrator.config import config_to_dict, flatten, load_config
    from orchestrator.train import main

    trial = make_trial(train__total_steps=50, run__name="single")  # warm start 20, a restart at 40
    trial["scaling"]["num_workers"] = 1
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(trial))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if ray.is_initialized():
        ray.shutdown()
    try:
        assert main([str(path), "--tracking-uri", tracking]) == 0
    finally:
        ray.shutdown()

    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    assert run.data.tags["status"] == "completed" and run.info.status == "FINISHED"
    resolved = flatten(config_to_dict(config_from_dict(trial)))
    assert run.data.params == {k: str(v) for k, v in resolved.items()}, "every key, defaults included"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")] == [0, 10, 20, 30, 40, 50]
    assert {"update_rank_mean", "update_rank_max", "train_loss", "lr"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if k.startswith("update_rank.")], "per-layer ranks are an artifact"

    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    assert load_config(str(local / "config.yaml"), None, []) == config_from_dict(trial)
    table = (local / "update_ranks" / "update_ranks.csv").read_text().splitlines()
    assert table[0] == "layer,step_40" and len(table) == 1 + 14  # 2 layers x 7 linears of llama-tiny
    assert all(int(line.split(",")[1]) > 0 for line in table[1:])
    assert (local / "update_ranks" / "update_ranks.png").stat().st_size > 1000
    assert not (local / "merged").exists(), "the weights are logged once: as the logged model"
    logged = client.get_logged_model(run.data.tags["logged_model_id"])
    assert logged.source_run_id == run.info.run_id
    weights = mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/model", tracking_uri=tracking)
    assert AutoModelForCausalLM.from_pretrained(weights) is not None  # without MLflow too

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)  # MLflow's own API reads it; undone after
    generate = mlflow.transformers.load_model(f"models:/{run.data.tags['logged_model_id']}")
    text = generate("To be, or not", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")
