"""The README's main job: a short ReLoRA pre-training that prints falling loss."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_tiny_prints_falling_loss():
    out = subprocess.run(
        [
            sys.executable,
            "examples/train_tiny.py",
            "--steps",
            "80",
            "--warm-start-steps",
            "20",
            "--restart-every",
            "20",
            "--warmup-steps",
            "5",
            "--rank",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    val = [float(v) for v in re.findall(r"val loss ([\d.]+)", out.stdout)]
    assert len(val) == 2 and val[1] < val[0] - 1.0, out.stdout
    assert out.stdout.count("restart: merged 14 layers") == 2, out.stdout  # at steps 40 and 60
