"""The fuzz corpus (fuzz/cases.yaml): every malformed spec or argument is refused with exit 2
and one line naming its key, with no traceback and before data preparation or Ray; every
valid edge case is accepted. All cases run in one process (fuzz/run_cases.py), Ray blocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FUZZ = Path(__file__).parent / "fuzz"
CORPUS = yaml.safe_load((FUZZ / "cases.yaml").read_text())


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fuzz")
    run = subprocess.run(
        [sys.executable, str(FUZZ / "run_cases.py"), str(out)], cwd=out, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["ray_imported"] is False, "a case reached Ray"
    return {outcome["id"]: outcome for outcome in report["results"]}


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [case["id"] for case in CORPUS["cases"] + CORPUS["valid"]]
    assert len(CORPUS["cases"]) >= 100 and len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CORPUS["cases"], ids=lambda case: case["id"])
def test_refused_in_one_line_naming_the_key(outcomes, case):
    outcome = outcomes[case["id"]]
    lines = outcome["stderr"].strip().splitlines()
    assert outcome["exit"] == 2 and len(lines) == 1, outcome
    assert lines[0].startswith("config error: ") and len(lines[0]) < 1000, lines[0]
    path = lines[0].removeprefix("config error: ").split(": ", 1)[0]
    assert path == case["path"] or path.endswith("/" + case["path"]), lines[0]
    assert "hunter2" not in lines[0], "credentials are never printed"


@pytest.mark.parametrize("case", CORPUS["valid"], ids=lambda case: case["id"])
def test_valid_edge_cases_are_accepted(outcomes, case):
    outcome = outcomes[case["id"]]
    # A sweep stops at --dry-run; a trial gets as far as starting Ray, which the runner refuses.
    expected = 0 if case.get("cli") == "sweep" else "work started"
    assert outcome["exit"] == expected, outcome


def _base(tmp_path: Path, **sections) -> dict:
    spec = {key: dict(value) for key, value in CORPUS["base"].items()}
    spec["data"]["cache_dir"] = str(tmp_path / "cache")
    spec["run"]["storage_path"] = str(tmp_path / "runs")
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def test_a_missing_text_column_is_refused_before_any_work(tmp_path):
    from orchestrator.config import ConfigError, check_environment, config_from_dict

    records = tmp_path / "records.jsonl"
    records.write_text('{"body": "a document"}\n')
    cfg = config_from_dict(_base(tmp_path, data={"source": "file", "paths": [str(records)], "text_column": "text"}))
    with pytest.raises(ConfigError) as error:
        check_environment(cfg)
    assert error.value.path == "data.text_column" and "body" in str(error.value)


@pytest.mark.parametrize("record", ["{trunc", "[1, 2]"])
def test_a_corrupt_sweep_record_is_refused_in_one_line(tmp_path, record):
    from orchestrator.config import ConfigError
    from orchestrator.search import load_sweep
    from orchestrator.sweep import SPEC_RECORD, check_unchanged

    spec = load_sweep({**_base(tmp_path), "search": CORPUS["search"]})
    (tmp_path / "runs" / "fuzz").mkdir(parents=True)
    (tmp_path / "runs" / "fuzz" / SPEC_RECORD).write_text(record)
    with pytest.raises(ConfigError) as error:
        check_unchanged(spec)
    assert error.value.path == "run.name" and "--fresh" in str(error.value)
