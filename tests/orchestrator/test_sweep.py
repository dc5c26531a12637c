"""A real sweep end to end: local Ray, 2 CPU workers per trial, ASHA, and MLflow read back
through a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import start_mlflow_server, trial_dict
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

# One shared warm start per LR. ASHA only compares trials with each other: a far lower LR makes a
# certainly worse trial, which it stops at its first rung whichever of the pair gets there first.
LRS = [0.003, 0.00003]
RANKS = [4, 8]


def test_killed_sweep_resumes_and_records_every_trial_in_mlflow(
    make_trial, data_cache, mlflow_server, tmp_path, monkeypatch
):
    """The sweep end to end, killed mid-run (driver and its local Ray) and run again: each trial
    keeps its one MLflow run and continues from its checkpoint, and the record is whole."""
    # One micro-batch per step and worker (the trial tests cover gradient accumulation).
    spec = make_trial(
        train__total_steps=60,
        train__checkpoint_every=10,
        train__micro_batch_size=8,
        run__name="e2e",
        run__max_failures=1,
    )
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
        time.sleep(0.5)  # each poll is 3+ requests to the server the sweep logs to
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = {r.data.tags["tune_trial_id"] for r in runs() if r.data.tags.get("status") == "completed"}
    assert len(done_before) < len(LRS) * len(RANKS)
    time.sleep(5)

    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "resuming the sweep" in out.stdout and "reused from" in out.stdout  # the warm starts too
    assert "best val_ppl" in out.stdout and "open the results" in out.stdout
    # A user reads the product's lines only (header, trial events, progress, summary, link):
    # Ray's, Tune's, DeepSpeed's and the workers' output is in the log the last line names.
    terminal = out.stdout.splitlines() + out.stderr.splitlines()
    assert len(terminal) <= 40, "\n".join(terminal)
    assert terminal[-1].startswith("full log: "), terminal[-3:]
    log = Path(terminal[-1].removeprefix("full log: "))
    assert log.is_relative_to(tmp_path) and "Trial status" in log.read_text()  # beside the sweep's trials

    parents = [r for r in runs() if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1, "the resumed sweep keeps its parent run"
    parent = parents[0]
    nested = [r for r in runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children = [r for r in nested if "tune_trial_id" in r.data.tags]
    assert len(children) == len(LRS) * len(RANKS), "each trial keeps its one MLflow run"

    # One full-rank warm start per LR, each with a run of its own, shared by the two ranks.
    warm = [r for r in nested if r.data.tags.get("sweep_role") == "warm_start"]
    assert len(warm) == len(LRS)
    # ... trained side by side: their steps' wall times overlap.
    from orchestrator.train import read_history

    spans = []
    for run in warm:
        times = [h["wall_time"] for h in read_history(run.data.tags["checkpoint"]) if "train_loss" in h]
        spans.append((min(times), max(times)))
    assert max(start for start, _ in spans) < min(end for _, end in spans), f"one after another: {spans}"
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

    # Every completed trial has its merged model, logged once as an MLflow model of its run
    # (no second copy among the run's artifacts), whose `model/` folder loads without MLflow.
    completed = [c for c in children if c.data.tags["status"] == "completed"]
    for child in completed:
        logged = client.get_logged_model(child.data.tags["logged_model_id"])
        assert logged.source_run_id == child.info.run_id and logged.status == LoggedModelStatus.READY
        assert "merged" not in {a.path for a in client.list_artifacts(child.info.run_id)}
        local = mlflow.artifacts.download_artifacts(
            f"{logged.artifact_location}/model", dst_path=str(tmp_path / child.info.run_id), tracking_uri=mlflow_server
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
    # ... as the logged MLflow model of that trial, which MLflow's own API loads and runs.
    assert versions[0].source == f"models:/{best.data.tags['logged_model_id']}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # MLflow's own API reads it; undone after
    generate = mlflow.transformers.load_model("models:/e2e-best/1")
    assert len(generate("To be", max_new_tokens=5, do_sample=False)[0]["generated_text"]) > len("To be")

    # The parent carries the result: best value and trial, the summary table.
    assert parent.data.metrics["best_val_ppl"] == best.data.metrics["best_val_ppl"]
    assert parent.data.tags["best_trial"] == best.data.tags["tune_trial_id"]
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert {"summary.txt", "summary.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # Every trial: its config as YAML, and per-layer ranks as a table, not as metrics.
    for child in children:
        assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}
        assert not [k for k in child.data.metrics if k.startswith("update_rank.")]
    for child in completed:
        ranks = {a.path for a in client.list_artifacts(child.info.run_id, "update_ranks")}
        assert ranks == {"update_ranks/update_ranks.csv", "update_ranks/update_ranks.png"}


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


def test_a_budget_larger_than_the_data_is_refused_before_any_work(make_trial, data_cache, tmp_path, capsys):
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


@dataclass
class FinishedSweep:
    tracking: str  # the sweep's MLflow store: sqlite:///<root>/mlflow.db
    spec: dict
    scheduler: object  # the sweep's own ASHA, kept to read what it recorded
    out: str  # what the sweep printed


class Tee(io.StringIO):
    """Keeps what is written, and passes it on (to pytest's capture, or the terminal under -s)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)


@pytest.fixture(scope="module")
def restart_period_sweep(data_cache, tmp_path_factory) -> FinishedSweep:
    """A small finished sweep, run once for the tests that read it (about 100 s): two trials that
    restart at different periods, under ASHA, recorded in a SQLite MLflow store of their own."""
    import orchestrator.sweep as sweep

    root = tmp_path_factory.mktemp("restart-period-sweep")
    spec = trial_dict(
        root,
        data_cache,
        train__total_steps=60,
        train__eval_every=5,
        train__checkpoint_every=20,
        train__micro_batch_size=8,  # two micro-batches a step on its one worker
        run__name="fair",
        run__max_failures=0,
    )
    del spec["scaling"]
    spec["search"] = {
        "params": {"relora.restart_every": {"grid": [20, 25]}},
        "scheduler": {"type": "asha", "grace_period": 25, "reduction_factor": 2},
        "max_concurrent_trials": 2,
        "resources": {"num_workers": 1},
    }
    schedulers, make_scheduler = [], sweep.make_scheduler

    def keep_scheduler(s):
        schedulers.append(make_scheduler(s))
        return schedulers[-1]

    tracking, out = run_sweep(root, spec, make_scheduler=keep_scheduler)
    return FinishedSweep(tracking, spec, schedulers[0], out)


def run_sweep(root: Path, spec: dict, **replaced) -> tuple[str, str]:
    """`python -m orchestrator.sweep` in this process (with ``replaced`` attributes of the sweep
    module), recorded in a SQLite MLflow store in ``root``: the store's URI and what it printed."""
    import ray

    import orchestrator.sweep as sweep

    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    out = Tee(sys.stdout)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in replaced.items():
            mp.setattr(sweep, name, value)
        mp.chdir(root)  # the store's artifacts (./mlruns) stay beside it, not in the repository
        if ray.is_initialized():
            ray.shutdown()
        try:
            with contextlib.redirect_stdout(out):
                assert sweep.main([str(path), "--tracking-uri", tracking]) == 0
        finally:
            ray.shutdown()
    return tracking, out.getvalue()


def test_asha_never_judges_a_trial_inside_its_restart_spike(restart_period_sweep):
    """Two trials that restart at different periods (20: jags at the switch and 40; 25: at the
    switch, 25 and 50), evaluated every 5 steps, ASHA rungs at 25 and 50. At rung 25 both are
    inside a re-warm (the switch at 20; the restart at 25), so each is judged at its first
    evaluation past it: 30 and 35. Both trials share one warm start (restart_every does not shape it)."""
    from orchestrator.config import config_from_dict

    tracking, spec, out = restart_period_sweep.tracking, restart_period_sweep.spec, restart_period_sweep.out
    assert "rungs at steps [25, 50]" in out and "warm starts: 1 " in out

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("fair")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "tune_trial_id" in r.data.tags]
    assert len({r.data.tags["warm_start_key"] for r in runs}) == 1 and len(runs) == 2
    (bracket,) = restart_period_sweep.scheduler._brackets  # what ASHA recorded: trial -> -val_ppl, per rung
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


def test_baselines_compare_every_method_at_one_budget(data_cache, tmp_path):
    """search_spaces/baselines.yaml at CPU scale: full rank, LoRA after a warm start, ReLoRA and
    GaLore (an LR grid of its own, of one value here) at one token budget, all on DDP. The summary puts each trial's
    speed and one worker's memory beside its perplexity, and every trial is recorded whole."""
    from orchestrator.config import load_yaml

    shipped = load_yaml(Path(__file__).resolve().parents[2] / "search_spaces" / "baselines.yaml")["search"]
    assert set(shipped["variants"]) == {"full-rank", "lora+warm-start", "relora", "galore"}
    spec = trial_dict(
        tmp_path,
        data_cache,
        relora__warm_start_steps=10,
        relora__restart_every=10,
        relora__restart_warmup_steps=3,
        relora__update_proj_gap=10,
        train__total_steps=40,
        train__eval_every=10,
        train__checkpoint_every=20,
        train__micro_batch_size=16,
        train__engine="ddp",
        run__name="baselines",
        run__max_failures=0,
    )
    del spec["scaling"]
    spec["search"] = {
        "variants": {
            "full-rank": {"relora.method": "full"},
            "lora+warm-start": {"relora.method": "lora"},
            "relora": {},
            "galore": {"relora.method": "galore", "relora.warm_start_steps": 0, "optim.lr": {"grid": [0.01]}},
        },
        "scheduler": {"type": "none"},
        "max_concurrent_trials": 2,
        "resources": {"num_workers": 1},
    }
    tracking, out = run_sweep(tmp_path, spec)

    header = next(line for line in out.splitlines() if re.match(r"trial\s{2,}variant", line))
    assert re.split(r"\s{2,}", header.strip()) == [
        "trial",
        "variant",
        "best val_ppl",
        "tokens/s",
        "memory/worker",
        "optimizer state",
        "status",
    ]
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("baselines")
    runs = {
        r.data.params["variant"]: r
        for r in client.search_runs([experiment.experiment_id])
        if "variant" in r.data.params
    }
    assert set(runs) == {"full-rank", "lora+warm-start", "relora", "galore lr=0.01"}
    for name, run in runs.items():
        assert run.data.tags["status"] == "completed" and run.data.tags.get("logged_model_id"), name
        assert run.data.params["train.engine"] == "ddp"
        val_ppl = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_ppl"), key=lambda m: m.step)]
        assert run.data.metrics["tokens_per_s"] > 0 and val_ppl[-1] < val_ppl[0] / 2, (name, val_ppl)
    assert runs["galore lr=0.01"].data.params["optim.lr"] == "0.01"  # the variant's grid, not the base's 0.003
    assert runs["relora"].data.tags["merges"] == "2"  # restarts at 20 and 30, on a plain torch AdamW

    def optimizer_bytes(name: str) -> float:  # one worker's, in its low-rank phase
        return runs[name].data.metrics["memory_optimizer_bytes"]

    # llama-tiny's 4096-token embeddings and lm_head (84% of it) train full-rank in every method:
    # the methods differ in the target layers' state alone (1 MB of 5 MB here).
    full = optimizer_bytes("full-rank")
    assert optimizer_bytes("relora") == optimizer_bytes("lora+warm-start") < full
    assert optimizer_bytes("galore lr=0.01") < full
    (parent,) = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'")
    summary = Path(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))).read_text()
    assert {"tokens_per_s", "memory_total_bytes", "memory_optimizer_bytes"} <= set(summary.splitlines()[0].split(","))


CHROMIUM = "/usr/bin/chromium"  # Debian's (apt-get install chromium), driven by the playwright package


def browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs the playwright Python package (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"needs {CHROMIUM} (apt-get install chromium)"
    return None


def test_the_mlflow_ui_shows_the_sweep_and_its_best_model(request, tmp_path):
    """The link the sweep printed, opened in headless Chromium on a real `mlflow server`: the
    trial runs are listed and the val_ppl chart draws each trial's curve; the registered model's
    page shows its version. A screenshot of the chart view is left in tmp_path. Skipped without
    playwright and Chromium, unless RELORA_REQUIRE_BROWSER=1 (as in .ci/run) makes that a failure."""
    reason = browser_missing()
    if reason:
        if os.environ.get("RELORA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the MLflow UI test cannot run here: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    from orchestrator.config import registry_name

    sweep = request.getfixturevalue("restart_period_sweep")
    client = MlflowClient(sweep.tracking)
    experiment = client.get_experiment_by_name(sweep.spec["run"]["name"])
    runs = client.search_runs([experiment.experiment_id])
    trials = {r.info.run_id: r.info.run_name for r in runs if "tune_trial_id" in r.data.tags}
    assert len(trials) == 2 and len(set(trials.values())) == 2
    curves = {  # what the chart must draw: each trial's val_ppl, step by step
        name: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "val_ppl"), key=lambda m: m.step)]
        for run_id, name in trials.items()
    }
    (link,) = re.findall(r"^  then (http://127\.0\.0\.1:5000/\S+)$", sweep.out, re.MULTILINE)
    assert f"/#/experiments/{experiment.experiment_id}/" in link
    registry = registry_name(sweep.spec["run"]["name"])
    shot = tmp_path / "mlflow-chart-view.png"
    wait = 60_000  # ms: the UI's first load on a busy 2-core machine

    root = Path(sweep.tracking.removeprefix("sqlite:///")).parent  # the sweep's store: root/mlflow.db
    with start_mlflow_server(root) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(wait)
        try:
            page.goto(link.replace("http://127.0.0.1:5000", base))
            expect(page.get_by_text("matching runs")).to_be_visible(timeout=wait)
            for run_id, name in trials.items():  # listed flat, not folded under the parent run
                row = page.locator(f'[role=row][row-id="{run_id}"]').filter(has_text=name)
                expect(row).to_be_visible(timeout=wait)
            assistant = page.get_by_role("button", name="Close", exact=True)  # MLflow 3.17's assistant panel, if open
            if assistant.count() == 1:
                assistant.click()

            # The val_ppl card (not best_val_ppl's). The charts are drawn as they scroll into view:
            # the chart search keeps the val_ppl ones, as a user would look for them.
            page.get_by_placeholder("Search metric charts").fill("val_ppl")
            title = re.compile(r"^\s*val_ppl\s*$")
            card = page.locator("[data-testid=experiment-view-compare-runs-card]").filter(has=page.get_by_text(title))
            expect(card).to_have_count(1, timeout=wait)
            plot = card.locator(".js-plotly-plot")
            expect(plot).to_be_visible(timeout=wait)
            drawn_all = "([el, ns]) => ns.every(n => (el.data || []).some(d => d.name === n && d.y?.length > 1))"
            page.wait_for_function(drawn_all, arg=[plot.element_handle(), sorted(curves)])
            series = plot.evaluate("el => el.data.map(d => ({name: d.name, x: [...(d.x || [])], y: [...(d.y || [])]}))")
            print("the val_ppl chart:", [(s["name"], len(s["y"])) for s in series])
            for name, curve in curves.items():
                drawn = [list(zip(s["x"], s["y"], strict=True)) for s in series if s["name"] == name]
                assert drawn and all(points == curve for points in drawn), (name, curve, drawn)
            page.wait_for_timeout(500)  # the last frame of plotly's drawing, for the screenshot
        finally:
            page.screenshot(path=str(shot))
            print(f"the chart view: {shot}")

        page.goto(f"{base}/#/models/{registry}")
        expect(page.locator(f'a[href="#/models/{registry}/versions/1"]')).to_have_text("Version 1", timeout=wait)
        browser.close()
