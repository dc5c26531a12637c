"""The cluster head's MLflow server, started and stopped by its own pid, and never outliving Ray.

`ray up` runs `start` after `ray start --head`; `ray down` only runs `ray stop`, so the server
watches Ray's GCS port and shuts itself down once Ray has gone. Nothing is found by a name
pattern: `stop` signals the pid in the folder's pid file, and only if that process is ours.

    python -m orchestrator.mlflow_server start ~/mlflow --artifacts-destination s3://bucket/mlflow
    python -m orchestrator.mlflow_server stop ~/mlflow
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODULE = "orchestrator.mlflow_server"
RAY_GONE_AFTER_FAILED_PROBES = 3  # consecutive refused connections before Ray counts as stopped
PROBE_PERIOD_S = 2.0


def pid_file(folder: Path) -> Path:
    return folder / "server.pid"


def our_pid(folder: Path) -> int | None:
    """The pid in the folder's pid file, if that process is alive and is this module's supervisor."""
    try:
        pid = int(pid_file(folder).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # A recycled pid belongs to another program: leave it alone.
    return pid if MODULE.encode() in cmdline and str(folder).encode() in cmdline else None


def stop(folder: Path, timeout_s: float = 30.0) -> bool:
    """Stop the server whose supervisor's pid is in ``folder``; True if one was running."""
    pid = our_pid(folder)
    if pid is None:
        pid_file(folder).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    pid_file(folder).unlink(missing_ok=True)
    return True


def reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def server_env() -> dict[str, str]:
    """The server's environment: MLflow's GenAI job runner off unless the user turned it on.

    MLflow 3 starts it by default, as seven `huey_consumer` processes beside the server, which
    took 17 s of CPU in their first 20 s on a 2-core head, next to the trials training there.
    It runs GenAI jobs (scorers, evaluations, trace rollups), none of which a sweep submits."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def supervise(folder: Path, server_args: list[str], ray_address: str | None) -> int:
    """Run `mlflow server` as a child; end it on SIGTERM, or once Ray at ``ray_address`` stops."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *server_args], env=server_env(), start_new_session=True
    )
    stopping = False

    def on_term(*_) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    failed_probes = 0
    while not stopping and server.poll() is None:
        time.sleep(PROBE_PERIOD_S)
        if ray_address:
            failed_probes = 0 if reachable(ray_address) else failed_probes + 1
            if failed_probes >= RAY_GONE_AFTER_FAILED_PROBES:
                print(f"Ray at {ray_address} has stopped: stopping MLflow", flush=True)
                stopping = True
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 0 if stopping else (server.returncode or 1)


def start(folder: Path, args: argparse.Namespace) -> int:
    """(Re)start the server detached, then wait until it answers; non-zero if it never does."""
    folder.mkdir(parents=True, exist_ok=True)
    stop(folder)
    host, port, ray_address = args.host, args.port, args.ray_address
    if ray_address and not reachable(ray_address):
        print(f"mlflow_server: Ray is not running at {ray_address}: start it first", file=sys.stderr)
        return 1
    server_args = ["--host", host, "--port", str(port), "--workers", "1"]
    server_args += ["--backend-store-uri", args.backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"]
    server_args += ["--artifacts-destination", args.artifacts_destination]
    command = [sys.executable, "-m", MODULE, "supervise", f"--ray-address={ray_address or ''}", str(folder)]
    with open(folder / "server.log", "ab") as log:
        supervisor = subprocess.Popen(
            command + ["--", *server_args], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pid_file(folder).write_text(f"{supervisor.pid}\n")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2)
            print(f"MLflow server at http://{host}:{port} (pid {supervisor.pid}, log {folder / 'server.log'})")
            return 0
        except OSError:
            time.sleep(1)
    print(f"mlflow_server: the server did not come up; see {folder / 'server.log'}", file=sys.stderr)
    stop(folder)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("start", help="(re)start the server; its database, log and pid file go in FOLDER")
    up.add_argument("folder", type=Path)
    up.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    up.add_argument("--port", type=int, default=5000)
    up.add_argument("--artifacts-destination", required=True, help="where artifacts go: a shared path or s3://...")
    up.add_argument("--backend-store-uri", default="", help="default: sqlite:///FOLDER/mlflow.db")
    up.add_argument("--ray-address", default="127.0.0.1:6379", help="stop when Ray's GCS here stops ('' : never)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")
    down = commands.add_parser("stop", help="stop the server whose pid file is in FOLDER")
    down.add_argument("folder", type=Path)
    run = commands.add_parser("supervise", help=argparse.SUPPRESS)
    run.add_argument("folder", type=Path)
    run.add_argument("--ray-address", default="")
    run.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    folder = args.folder.expanduser().resolve()
    if args.command == "start":
        return start(folder, args)
    if args.command == "stop":
        print("MLflow server stopped" if stop(folder) else "no MLflow server was running")
        return 0
    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    return supervise(folder, server_args, args.ray_address or None)


if __name__ == "__main__":
    sys.exit(main())
