"""The head's MLflow server: started and stopped by its pid file, and gone once Ray is gone."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import free_port

from orchestrator import mlflow_server


def answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        return True
    except OSError:
        return False


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.mlflow_server", *args], capture_output=True, text=True)


def start(folder: Path, port: int, gcs: str) -> list[psutil.Process]:
    """Start a server with the CLI; its supervisor and the supervisor's children."""
    artifacts = folder.parent / "artifacts"
    started = cli(
        "start", str(folder), f"--port={port}", f"--artifacts-destination={artifacts}", f"--ray-address={gcs}"
    )
    assert started.returncode == 0, started.stderr
    supervisor = psutil.Process(int((folder / "server.pid").read_text()))
    return [supervisor, *supervisor.children(recursive=True)]


def all_gone(processes: list[psutil.Process]) -> bool:
    return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in processes)


def wait_until(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def fake_gcs():
    """A listening port where Ray's GCS would be; closing it is what `ray stop` looks like."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def test_start_and_stop_by_pid_file(tmp_path, fake_gcs):
    folder, port = tmp_path / "mlflow", free_port()
    gcs = f"127.0.0.1:{fake_gcs.getsockname()[1]}"
    family = start(folder, port, gcs)
    assert answers(port)
    assert (folder / "mlflow.db").is_file()
    # No GenAI job runner (MLflow 3 starts seven processes for it) beside the trials on the head.
    commands = [" ".join(p.cmdline()) for p in family if p.is_running()]
    assert any("mlflow server" in c for c in commands) and not [c for c in commands if "mlflow.server.jobs" in c]

    # Starting again replaces the server rather than failing on the busy port.
    start(folder, port, gcs)
    assert wait_until(lambda: all_gone(family), 30)

    stopped = cli("stop", str(folder))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not answers(port) and not (folder / "server.pid").exists()
    assert cli("stop", str(folder)).stdout.strip() == "no MLflow server was running"


def test_a_pid_file_naming_another_program_is_left_alone(tmp_path):
    folder = tmp_path / "mlflow"
    folder.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / "server.pid").write_text(f"{bystander.pid}\n")  # a recycled pid, say
        assert not mlflow_server.stop(folder)
        assert bystander.poll() is None
    finally:
        bystander.kill()


def test_the_server_stops_when_ray_stops(tmp_path, fake_gcs):
    folder, port = tmp_path / "mlflow", free_port()
    gcs = f"127.0.0.1:{fake_gcs.getsockname()[1]}"
    family = start(folder, port, gcs)
    time.sleep(3 * mlflow_server.PROBE_PERIOD_S)
    assert answers(port), "the server must keep running while Ray does"

    fake_gcs.close()  # `ray stop`
    assert wait_until(lambda: all_gone(family), 60), [p for p in family if p.is_running()]
    assert not answers(port)
    assert "Ray at" in Path(folder / "server.log").read_text()


def test_start_refuses_without_ray(tmp_path):
    closed = f"127.0.0.1:{free_port()}"
    result = cli("start", str(tmp_path), f"--artifacts-destination={tmp_path}", f"--ray-address={closed}")
    assert result.returncode == 1 and "Ray is not running" in result.stderr
