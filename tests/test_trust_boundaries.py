"""What we write to storage and read back is never a pickle: only Tune's and DeepSpeed's own
checkpoints are (README, "Bad input, and what must be trusted"). A source scan, so that a new
torch.save or pickle on our side fails here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("orchestrator/*.py"), *ROOT.glob("relora/*.py")])
UNSAFE = re.compile(r"\btorch\.(save|load)\(|\bimport pickle\b|\bpickle\.|\bcloudpickle\b|allow_pickle\s*=\s*True")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_our_state_is_safetensors_json_or_numpy_without_pickles(path):
    found = [line.strip() for line in path.read_text().splitlines() if UNSAFE.search(line)]
    assert not found, found


def test_the_scan_sees_an_unsafe_load():
    assert UNSAFE.search("state = torch.load(path)") and UNSAFE.search("np.load(f, allow_pickle=True)")
