"""`ray up cluster.local.yaml` as a user runs it, against an SSH server on this machine.

The head is 127.0.0.1, reached over SSH as a throwaway user whose login profile puts
another Python first on PATH (as pyenv or conda would). Only the lines of
cluster.local.yaml marked EDIT are changed. Then the README's `ray job submit` runs the
demo sweep, with token authentication on, and `ray down` must leave nothing behind.

Needs root (to add the user), Debian's openssh-server and rsync, and the ports
22, 5000, 6379, 8265 and 52365 (the head's job agent) of 127.0.0.1 free: any Ray
this test process started is shut down first. Elsewhere it is skipped, unless
RELORA_REQUIRE_RAY_UP=1 (as in .ci/run) turns that into a failure.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
USER = "relora-rayup"
DASHBOARD = "http://127.0.0.1:8265"
MLFLOW = "http://127.0.0.1:5000"
AGENT_PORT = 52365  # every raylet's dashboard agent, even with include_dashboard=False


def missing_requirement() -> str | None:
    # A Ray left running by earlier tests in this process holds the agent port: the head's own
    # agent then never registers, and every job submit is refused with "No available agent".
    import ray

    ray.shutdown()
    if os.geteuid() != 0:
        return "needs root, to add a throwaway SSH user"
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync", "useradd"):
        if not shutil.which(tool):
            return f"needs {tool} (apt-get install openssh-server rsync)"
    for port in (22, 5000, 6379, 8265, AGENT_PORT):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"port {port} of 127.0.0.1 is in use"
    return None


@dataclass
class Machine:
    root: Path
    home: Path
    key: Path
    laptop_env: dict

    def run(self, *command: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
        """A command on the laptop, from this checkout, as the README runs it; its time is printed
        (pytest shows it with a failure, or under -s)."""
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=REPO, env=self.laptop_env, text=True, capture_output=True, timeout=timeout, **kwargs
        )
        print(f"{time.monotonic() - started:6.1f} s  {' '.join(command[:6])}")
        return done


def user_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["username"]) if p.info["username"] == USER]


def seed_head_venv(venv: Path) -> None:
    """The head's image with this project's dependencies on it already, as a GPU image has torch:
    `~/relora-venv` made by the head's own python3, holding a copy of this venv's packages and
    commands (not this checkout's own install). cluster.local.yaml's setup commands then run as
    written: `python3 -m venv` keeps it, `pip install -e` finds every requirement met and
    installs the synced checkout. What is skipped is downloading them (191 s of CI here).
    A head Python of another minor version gets no seed: it installs everything, as before."""
    python = shutil.which("python3", path="/usr/bin") or "/usr/bin/python3"
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    if version.stdout.strip() != str(sys.version_info[:2]):
        return
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target = subprocess.run([venv / "bin" / "python", "-c", purelib], capture_output=True, text=True, check=True)
    ours = shutil.ignore_patterns("relora_sweeps*", "__editable__*relora*", "pip", "pip-*")
    source = sysconfig.get_paths()["purelib"]
    shutil.copytree(source, target.stdout.strip(), symlinks=True, ignore=ours, dirs_exist_ok=True)
    for script in Path(sys.executable).parent.iterdir():  # `ray`, `mlflow`, ... with the head venv's python
        if script.name.startswith(("python", "activate", "pip", "Activate")) or not script.is_file():
            continue
        lines = script.read_bytes().split(b"\n", 1)
        if len(lines) == 2 and lines[0].startswith(b"#!") and b"python" in lines[0]:
            (venv / "bin" / script.name).write_bytes(b"#!" + str(venv / "bin" / "python").encode() + b"\n" + lines[1])
            (venv / "bin" / script.name).chmod(0o755)


@pytest.fixture(scope="module")
def machine():
    reason = missing_requirement()
    if reason:
        if os.environ.get("RELORA_REQUIRE_RAY_UP") == "1":
            pytest.fail(f"the ray up test cannot run here: {reason}")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="relora-rayup-", dir="/tmp"))
    root.chmod(0o755)
    home, laptop = root / "home", root / "laptop"
    laptop.mkdir()
    (root / "shared").mkdir(mode=0o777)
    (root / "shared").chmod(0o777)
    subprocess.run(["userdel", "-r", USER], capture_output=True)
    subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/bin/bash", "-p", "*", USER], check=True)
    seed_head_venv(home / "relora-venv")
    uid = pwd.getpwnam(USER).pw_uid
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
    (home / ".ssh").mkdir(mode=0o700)
    shutil.copy(f"{key}.pub", home / ".ssh" / "authorized_keys")
    # The head's own login profile: another Python first on PATH (pyenv's shims, conda's base),
    # one without our packages, and a temp dir of its own (a machine does not share /tmp).
    decoy = home / "other-python"
    decoy.mkdir()
    for name in ("python", "python3"):
        (decoy / name).symlink_to(shutil.which("python3", path="/usr/bin") or "/usr/bin/python3")
    with (home / ".bashrc").open("a") as bashrc:
        bashrc.write(f'\nexport PATH={decoy}:$PATH TMPDIR=$HOME/tmp\nmkdir -p "$TMPDIR"\n')
    for path in [home, *home.rglob("*")]:
        os.lchown(path, uid, uid)

    sshd_config = root / "sshd_config"
    sshd_config.write_text(
        f"Port 22\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AllowUsers {USER}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    subprocess.run(["/usr/sbin/sshd", "-f", str(sshd_config), "-E", str(root / "sshd.log")], check=True)
    laptop_env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the laptop's `ray`, from this venv
        "HOME": str(laptop),  # the laptop's ~/.ray/auth_token, apart from this machine's own
        "LANG": "C.UTF-8",
    }
    try:
        yield Machine(root, home, key, laptop_env)
    finally:
        subprocess.run(["kill", (root / "sshd.pid").read_text().strip()], capture_output=True)
        for process in user_processes():
            process.kill()
        subprocess.run(["userdel", "-r", USER], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def head_logs(machine: Machine) -> str:
    """The tails of the head's agent and raylet logs, for a failure message."""
    tails = []
    for log in sorted(machine.home.glob("**/session_latest/logs/*")):
        if log.name in ("dashboard_agent.log", "raylet.out", "dashboard.log") and log.is_file():
            tails.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-2000:])
    return "\n".join(tails)


def edited_cluster_file(machine: Machine) -> Path:
    """cluster.local.yaml with its EDIT lines set for this machine, and nothing else changed."""
    original = (REPO / "cluster.local.yaml").read_text().splitlines()
    shared = machine.root / "shared"
    edits = [
        (r"head_ip: \S+", "head_ip: 127.0.0.1"),
        (r"worker_ips: \[.*?\]", "worker_ips: []"),
        (r"ssh_user: \S+", f"ssh_user: {USER}"),
        (r"ssh_private_key: \S+", f"ssh_private_key: {machine.key}"),
        (r"^min_workers: \d+", "min_workers: 0"),
        (r"^max_workers: \d+", "max_workers: 0"),
        (r"(pip install .*?)(\s+# EDIT)", r"\1 -c ~/relora/constraints/cpu.txt\2"),
        (r"/mnt/shared/relora", str(shared)),
    ]
    edited = []
    for line in original:
        for pattern, replacement in edits:
            line = re.sub(pattern, replacement, line)
        edited.append(line)
    changed = [new for old, new in zip(original, edited, strict=True) if old != new]
    assert len(changed) >= 8 and all("# EDIT" in line for line in changed), changed
    path = machine.root / "cluster.yaml"
    path.write_text("\n".join(edited) + "\n")
    return path


def test_ray_up_job_submit_and_ray_down(machine):
    cluster = edited_cluster_file(machine)
    # README, "Once": the cluster's token on the laptop, which `ray up` copies to the nodes.
    token = machine.run("ray", "get-auth-token", "--generate")
    assert token.returncode == 0, token.stderr
    up = machine.run("ray", "up", "-y", str(cluster), timeout=1200)
    assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
    try:
        assert "ray down" in up.stdout + up.stderr  # what `ray up` prints when it is done (README)
        laptop_token = (machine.root / "laptop" / ".ray" / "auth_token").read_text()
        assert (machine.home / ".ray" / "auth_token").read_text() == laptop_token

        # Token authentication is on: without the token the job server refuses us.
        refused = machine.run("ray", "job", "list", "--address", DASHBOARD, timeout=120)
        assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

        # The README's commands, word for word but for the address (no tunnel to the same machine).
        machine.laptop_env["RAY_AUTH_MODE"] = "token"
        submit = ["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--"]
        for _ in range(12):  # right after `ray up` the head's job agent may not have registered yet
            job = machine.run(*submit, "python", "-m", "orchestrator.sweep", "search_spaces/demo.yaml", timeout=1500)
            output = job.stdout + job.stderr
            if "No available agent to submit job" not in output:
                break
            time.sleep(5)
        assert job.returncode == 0 and "succeeded" in output, output[-6000:] + head_logs(machine)
        # The sweep driver turns off the autoscaler's "No available node types ..." lines,
        # which it would otherwise print every 5 s while trials wait for room (orchestrator.console).
        assert "(autoscaler" not in output, [line for line in output.splitlines() if "(autoscaler" in line][:3]
        (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' succeeded", output))
        assert job_id in machine.run("ray", "job", "list", "--address", DASHBOARD, timeout=120).stdout
        assert "best trial" in machine.run("ray", "job", "logs", job_id, "--address", DASHBOARD, timeout=120).stdout

        # The runs are in the head's MLflow server; data, warm starts and checkpoints in the storage.
        client = MlflowClient(MLFLOW)
        experiment = client.get_experiment_by_name("demo")
        runs = client.search_runs([experiment.experiment_id])
        trials = [r for r in runs if "tune_trial_id" in r.data.tags]
        assert len(trials) == 4 and {r.data.tags["status"] for r in trials} <= {"completed", "early-stopped"}
        assert any("logged_model_id" in r.data.tags for r in trials)
        storage = machine.root / "shared" / "sweeps"
        assert list(storage.glob("data/blocks-*/meta.json"))
        assert list(storage.glob("warm-starts/*.json"))
        assert list(storage.glob("demo-trials/*/checkpoint_*"))
        assert list((machine.root / "shared" / "mlflow-artifacts").rglob("model.safetensors"))
    finally:
        down = machine.run("ray", "down", "-y", str(cluster), timeout=300)
    assert down.returncode == 0, down.stderr[-4000:]
    assert "Exception occurred when stopping" not in down.stdout + down.stderr
    # Nothing of the cluster's is left: no Ray, no MLflow, no session of the head's user.
    deadline = time.monotonic() + 90
    while (left := user_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, [" ".join(p.cmdline()) for p in left if p.is_running()]
