"""Fixtures for the orchestrator: real text, a prepared Arrow cache, a local Ray."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.mlflow_server import server_env

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_section() -> dict:
    """tinyshakespeare from ../shared when it is there, else the built-in CPython corpus.

    The tests need nothing outside the repository: a clone with nothing beside it runs
    them all on the built-in corpus (`.ci/run` checks that)."""
    if SHAKESPEARE.is_file():
        return {"source": "file", "paths": [str(SHAKESPEARE)]}
    return {"source": "builtin"}


def trial_dict(tmp_path: Path, data_cache: Path | None = None, **overrides) -> dict:
    """A tiny ReLoRA trial on `corpus_section()`: warm start 20, restarts at 40 and 60, 70 steps."""
    cfg = {
        "seed": 0,
        "model": {"name": "llama-tiny"},
        "data": {
            **corpus_section(),
            "seq_len": 64,
            "cache_dir": str(data_cache or tmp_path / "data"),
        },
        "relora": {
            "method": "relora",
            "rank": 4,
            "alpha": 8,
            "warm_start_steps": 20,
            "restart_every": 20,
            "restart_warmup_steps": 5,
            "reset_ratio": 0.99,
        },
        "optim": {"lr": 0.003, "warmup_steps": 5},
        "train": {
            "total_steps": 70,
            "global_batch_size": 16,
            "micro_batch_size": 4,
            "eval_every": 10,
            "eval_blocks": 64,
            "checkpoint_every": 10,
            "log_every": 5,
            # W_now - W_start is a sum of merged rank-4 updates, exact up to float rounding:
            # count every real direction, on any corpus, not only the large ones.
            "update_rank_threshold": 0.001,
        },
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"name": "trial", "storage_path": str(tmp_path / "runs"), "max_failures": 0},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


@pytest.fixture
def make_trial(shakespeare, tmp_path, request):
    """``make_trial(**{"section__key": value})``: the test trial as a dict, with overrides.

    Its data is the session's prepared cache when the test also uses `data_cache` (directly or
    through `local_ray`); otherwise a cache path of its own, never prepared: a test that only
    reads a config starts no Ray, and runs beside the Ray tests (tests/conftest.py)."""
    cache = request.getfixturevalue("data_cache") if "data_cache" in request.fixturenames else None
    return lambda **overrides: trial_dict(tmp_path, cache, **overrides)


@pytest.fixture(scope="session")
def data_cache(shakespeare, tmp_path_factory) -> Path:
    """The test trial's tokenized data, prepared once per session on a Ray of its own
    (shut down after: the tests that need Ray start theirs with their own resources)."""
    from orchestrator.config import config_from_dict
    from orchestrator.data import prepare_data

    cache = tmp_path_factory.mktemp("data-cache")
    with ray_for_data():
        prepare_data(config_from_dict(trial_dict(cache, cache)).data)
    return cache


@pytest.fixture(scope="module")
def ray_data():
    """A local Ray for the tests that prepare data directly."""
    with ray_for_data():
        yield


@contextlib.contextmanager
def ray_for_data():
    """A local Ray for Ray Data, unless one is running in this process already."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """A real text file: tinyshakespeare, or the built-in corpus written out once."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    from orchestrator.data import builtin_documents

    path = Path(tempfile.mkdtemp()) / "cpython-docs.txt"
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in builtin_documents()))
    return path


@pytest.fixture(scope="session")
def local_ray(data_cache):
    import ray

    # Logical CPUs are scheduling slots: 2 workers + the Train controller, with room to spare.
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


# Each command a fresh run of the module, as `python -m` runs it, in one Python process (a process
# per command spends seconds starting Python and importing torch); Ray must still be unimported after
# every refusal, since the CLIs check their input before they import it.
_CLI_PROBE = """
import contextlib, io, json, runpy, sys
module, results = sys.argv[1], []
for argv in json.loads(sys.argv[2]):
    sys.argv, out, err, code = [module, *argv], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__")
        except SystemExit as e:
            code = e.code
    ray_imported = "ray" in sys.modules
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "ray_imported": ray_imported})
print(json.dumps(results))
"""


def run_cli(module: str, commands: list[list[str]]) -> list[dict]:
    """`python -m module *argv` for each argv, in one process: exit code, stdout, stderr, and
    whether Ray was imported by then."""
    out = subprocess.run(
        [sys.executable, "-c", _CLI_PROBE, module, json.dumps(commands)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_mlflow_server(root: Path, host: str = "127.0.0.1", port: int | None = None):
    """A real `mlflow server` (SQLite store, proxied artifacts under ``root``); yields its URI."""
    port = port or free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
        + ["--artifacts-destination", str(root / "artifacts"), "--host", host, "--port", str(port), "--workers", "1"],
        env=server_env(),  # as the head's server runs: no GenAI job runner
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its uvicorn workers go with it
    )
    uri = f"http://127.0.0.1:{port}"

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    deadline = time.time() + 300  # a loaded 2-core machine can take minutes to start it
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                stop()
                raise RuntimeError("mlflow server did not come up") from None
            time.sleep(1)
    try:
        yield uri
    finally:
        stop()


@pytest.fixture
def mlflow_server(tmp_path):
    with start_mlflow_server(tmp_path) as uri:
        yield uri
