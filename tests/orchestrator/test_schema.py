"""The exported JSON Schema: current, referenced by every shipped YAML, and as strict as the loader."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.schema import SCHEMA_FILE, render

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("search_spaces/*.yaml"), *ROOT.glob("examples/*.yaml")])


def test_the_exported_schema_is_current():
    assert SCHEMA_FILE.read_text() == render(), "run `python -m orchestrator.schema` and commit the result"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_points_at_the_schema_and_passes_it(path):
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../orchestrator/config.schema.json"
    assert (path.parent / "../orchestrator/config.schema.json").resolve() == SCHEMA_FILE
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize(
    "bad",
    [
        {"relora": {"rnak": 4}},  # a misspelled key
        {"trainer": {}},  # an unknown section
        {"deepspeed": {"zero_stage": 4}},
        {"model": {"name": "llama-7b"}},
        {"search": {"metric": "accuracy"}},
        {"train": {"total_steps": "many"}},
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA_FILE.read_text()))


def _leaf_keys(schema: dict, node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, prop in node.get("properties", {}).items():
        if "$ref" in prop and prefix + name != "search":
            keys |= _leaf_keys(schema, schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]], f"{prefix}{name}.")
        elif prefix + name != "search":
            keys.add(prefix + name)
    return keys


def test_the_readme_lists_every_config_key_and_no_other():
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Every config key", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`([a-z_.]+)`", row.split(" | ")[0])}
    schema = json.loads(SCHEMA_FILE.read_text())
    assert documented == _leaf_keys(schema, schema)
