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


def _schema_node(schema: dict, key: str) -> dict:
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _split_cells(cell: str) -> list[str]:
    """``1e-3, [0.9, 0.95], 0.0`` -> three values: commas inside brackets do not split."""
    values, depth, current = [], 0, ""
    for char in cell:
        depth += char in "[{" and 1 or 0
        depth -= char in "]}" and 1 or 0
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return [*values, current.strip()]


def test_the_readme_defaults_are_the_specs():
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Every config key", 1)[1].split("\n## ", 1)[0]
    schema = json.loads(SCHEMA_FILE.read_text())
    checked = 0
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        cells = row.split(" | ")
        keys = re.findall(r"`([a-z_.]+)`", cells[0])
        if keys == ["relora.target_modules"]:  # written out as prose: checked below
            continue
        shown = _split_cells(cells[1])
        assert len(shown) == len(keys), row
        for key, text in zip(keys, shown, strict=True):
            default = _schema_node(schema, key).get("default")
            value = yaml.safe_load(text.strip("`").replace('""', "''"))
            if isinstance(value, str) and re.fullmatch(r"[0-9.]+e-?[0-9]+", value):
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
            if value is None and default is None:  # `{}`/`[]` fields default by factory
                continue
            same = value == default or (value in ({}, []) and default is None)
            assert same, f"README: {key} = {text}, spec: {default}"
            checked += 1
    assert checked >= 40
    modules = _schema_node(schema, "relora").get("properties")["target_modules"]["default"]
    assert modules == [f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")]


def test_the_readme_search_block_shows_every_search_key_and_passes_the_schema():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Sweeps", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    example = yaml.safe_load(block)
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(example, schema)
    for key in ("search", "search.scheduler", "search.resources"):
        shown = example
        for part in key.split("."):
            shown = shown[part]
        assert set(shown) == set(_schema_node(schema, key)["properties"]), key
