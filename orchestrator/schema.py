"""The JSON Schema of trial configs and sweep files, for editors that complete and check keys.

Generated from the config dataclasses (pydantic reads them as they are), with unknown keys
refused everywhere and the model names listed. The shipped YAML files point at the exported
copy, `orchestrator/config.schema.json`, with a `yaml-language-server` comment; a test keeps
that copy current. Regenerate it with:

    python -m orchestrator.schema
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from pydantic import TypeAdapter

import relora
from orchestrator.config import TrialConfig
from orchestrator.search import SearchSpec

SCHEMA_FILE = Path(__file__).with_name("config.schema.json")


def _closed(node):
    """Every object with declared properties refuses other keys, as the loader does."""
    if isinstance(node, dict):
        if "properties" in node and node.get("type") == "object":
            node["additionalProperties"] = False
        return {k: _closed(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


def json_schema() -> dict:
    """One schema for both files: a trial config, plus an optional `search` block for a sweep."""
    trial = TypeAdapter(TrialConfig).json_schema()
    search = TypeAdapter(SearchSpec).json_schema()
    defs = {**trial.pop("$defs"), **search.pop("$defs", {}), "SearchSpec": search}
    defs["ModelConfig"]["properties"]["name"]["enum"] = sorted(relora.MODEL_SHAPES)
    properties = {**trial["properties"], "search": {"$ref": "#/$defs/SearchSpec"}}
    assert {f.name for f in fields(TrialConfig)} | {"search"} == set(properties)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "relora-sweeps trial config or sweep file",
        "type": "object",
        "properties": properties,
        "$defs": defs,
    }
    return _closed(schema)


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_FILE.write_text(render())
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
