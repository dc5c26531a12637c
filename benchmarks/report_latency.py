"""What one `ray.train.report` costs a worker, at Ray's default controller poll and at ours.

    python benchmarks/report_latency.py [--reports 20] [--intervals default 0.5 0.25 0.1] [--modes SYNC ASYNC]

Ray Train's controller takes a worker's report only when it polls its workers
(`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s by default), and a worker holds one untaken report
at a time: a worker that reports faster than the poll waits for it at every report. Each
interval runs in a fresh process (Ray hands the variable from the driver to the controller
when the trainer starts): a local Ray, a TorchTrainer of 2 CPU workers that do nothing but
report, and rank 0's mean seconds per report. `orchestrator.train.make_trainer` sets 0.25 s
unless the variable is set. Each upload mode (``checkpoint_upload_mode``: the worker's
reports go through Ray's background thread with ASYNC, which `orchestrator.worker` uses) is
timed at each interval.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

DRIVER = """
import sys, tempfile, time
import ray, ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

reports, mode = int(sys.argv[1]), ray.train.CheckpointUploadMode[sys.argv[2]]

def loop(config):
    started = time.perf_counter()
    for i in range(reports):
        ray.train.report({"i": i}, checkpoint_upload_mode=mode)
    if ray.train.get_context().get_world_rank() == 0:  # to the driver's stdout, through Ray's log
        print("SECONDS_PER_REPORT", (time.perf_counter() - started) / reports, flush=True)

ray.init(num_cpus=3, include_dashboard=False)
TorchTrainer(
    loop, scaling_config=ScalingConfig(num_workers=2), run_config=RunConfig(storage_path=tempfile.mkdtemp())
).fit()
time.sleep(2)  # the worker's log lines reach the driver asynchronously
"""


def measure(interval: str, reports: int, mode: str) -> float:
    env = dict(os.environ)
    env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    if interval != "default":
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(reports), mode],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        timeout=600,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    (seconds,) = re.findall(r"SECONDS_PER_REPORT ([0-9.]+)", out.stdout + out.stderr)[:1]
    return float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=20)
    parser.add_argument("--intervals", nargs="+", default=["default", "0.5", "0.25", "0.1"])
    parser.add_argument("--modes", nargs="+", default=["SYNC", "ASYNC"], choices=["SYNC", "ASYNC"])
    args = parser.parse_args()
    print("| controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) | upload mode | seconds per report |")
    print("| --- | --- | ---: |")
    for interval in args.intervals:
        shown = "Ray's default (2 s)" if interval == "default" else f"{interval} s"
        for mode in args.modes:
            print(f"| {shown} | {mode} | {measure(interval, args.reports, mode):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
