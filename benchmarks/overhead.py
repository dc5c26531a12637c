"""What the orchestration costs: where a sweep's wall time goes when the training is small.

    python benchmarks/overhead.py                 # the demo sweep (2 x 2 trials) on this machine

1. Data: prepares the sweep's tokenized data into an empty cache (first run), then again
   (the cache hit every later trial and sweep gets), and times both.
2. A real sweep (`python -m orchestrator.sweep`, local Ray, DeepSpeed workers, MLflow in
   SQLite), then, per trial, from its MLflow run and the `history.jsonl` its workers wrote:
   - trial start (Tune starts the trial) to its workers' start (Ray Train's worker group),
   - workers' start to the first optimizer step (model, data, DeepSpeed engine),
   - the share of the trial's wall time spent inside optimizer steps.
3. Time to the first trial, with the sweep's warm starts trained one at a time (as before
   they ran side by side) and side by side: the same sweep twice, once with
   `search.max_concurrent_trials=1` (which also caps warm starts at one at a time; it
   changes nothing before the first trial starts) and once as written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def time_data_preparation(spec: dict, cache_dir: Path) -> list[tuple[str, float, bool]]:
    from orchestrator.config import config_from_dict
    from orchestrator.data import prepare_data

    trial = {k: v for k, v in spec.items() if k != "search"}
    trial["data"] = {**trial["data"], "cache_dir": str(cache_dir)}
    cfg = config_from_dict(trial).data
    import ray

    rows = []
    ray.init(include_dashboard=False)  # Ray Data's engine; its start is not counted
    for label in ("first run", "second run"):
        started = time.perf_counter()
        prepared = prepare_data(cfg)
        rows.append((label, time.perf_counter() - started, prepared.cache_hit))
    ray.shutdown()
    return rows


def trial_timings(tracking_uri: str, experiment: str, work: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    rows = []
    for run in client.search_runs([exp.experiment_id]):
        tags = run.data.tags
        if "tune_trial_id" not in tags or tags.get("status") != "completed":
            continue
        local = client.download_artifacts(run.info.run_id, "history.jsonl", str(work / run.info.run_id))
        history = [json.loads(line) for line in Path(local).read_text().splitlines()]
        done = history[-1]
        start, end = run.info.start_time / 1000, run.info.end_time / 1000
        rows.append(
            {
                "trial": run.info.run_name,
                "wall_s": end - start,
                "to_workers_s": done["worker_started_at"] - start,
                "to_first_step_s": done["first_step_at"] - done["worker_started_at"],
                "start_to_first_step_s": done["first_step_at"] - start,
                "train_s": done["train_seconds"],
                "train_share": done["train_seconds"] / (end - start),
            }
        )
    return rows


def run_sweep(spec: dict, work: Path, overrides: list[str]) -> tuple[float, float, list[dict]]:
    """One sweep in a fresh storage and MLflow store: (wall s, s to the first trial's start, trials)."""
    from mlflow.tracking import MlflowClient

    work.mkdir(parents=True)
    spec = {**spec, "run": {**spec.get("run", {}), "storage_path": str(work / "runs")}}
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    command = [sys.executable, "-m", "orchestrator.sweep", str(path), "--tracking-uri", tracking, "--fresh"]
    for override in overrides:
        command += ["--set", override]
    began = time.time()
    out = subprocess.run(command, cwd=work, capture_output=True, text=True)
    sweep_s = time.time() - began
    if out.returncode != 0:
        sys.exit(f"the sweep failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(spec["run"]["name"])
    trials = [r for r in client.search_runs([experiment.experiment_id]) if "tune_trial_id" in r.data.tags]
    first = min(r.info.start_time for r in trials) / 1000 - began
    return sweep_s, first, trial_timings(tracking, spec["run"]["name"], work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default=str(ROOT / "search_spaces" / "demo.yaml"))
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text())
    with tempfile.TemporaryDirectory(prefix="relora-overhead-") as tmp:
        work = Path(tmp)
        print("data preparation (an empty cache, then the same settings again):")
        for label, seconds, hit in time_data_preparation(spec, work / "data"):
            print(f"  {label:10s} {seconds:7.2f} s  ({'cache hit' if hit else 'prepared'})")

        spec["data"]["cache_dir"] = str(work / "data")  # the cache just prepared: the sweep hits it
        first_trial = {}
        for label, overrides in (("one at a time", ["search.max_concurrent_trials=1"]), ("side by side", [])):
            print(f"\nsweep {args.spec}, warm starts {label} ...", flush=True)
            sweep_s, first_trial[label], rows = run_sweep(spec, work / label.replace(" ", "-"), overrides)
            print(f"  {sweep_s:.0f} s, first trial started {first_trial[label]:.1f} s after the sweep began")

    print("\n| warm starts | sweep start -> first trial s |\n| --- | ---: |")
    for label, seconds in first_trial.items():
        print(f"| {label} | {seconds:.1f} |")
    print(f"\nthe side-by-side sweep: {len(rows)} completed trials\n")
    print(
        "| trial | wall s | start -> workers s | workers -> first step s | start -> first step s "
        "| in optimizer steps s | share |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: r["trial"]):
        print(
            f"| {r['trial']} | {r['wall_s']:.1f} | {r['to_workers_s']:.1f} | {r['to_first_step_s']:.1f} "
            f"| {r['start_to_first_step_s']:.1f} | {r['train_s']:.1f} | {r['train_share']:.0%} |"
        )
    if rows:
        print(
            f"\nmean: start -> first step {statistics.mean(r['start_to_first_step_s'] for r in rows):.1f} s, "
            f"share of trial wall time in optimizer steps {statistics.mean(r['train_share'] for r in rows):.0%}"
        )


if __name__ == "__main__":
    main()
