"""The routing file's JSON Schema, the chart's schema and README's table come from the model."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import jsonschema
import yaml
from skyroute.proxy.regenerate import (
    HELM_VALUES_SCHEMA,
    README,
    helm_values_schema,
    readme_with_table,
)

from .conftest import CALL_TIMEOUT_S

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "proxy" / "demo" / "demo.yaml"


async def _skyroute_schema(tmp_path: Path) -> dict:
    """``skyroute schema > s.json``, read back."""
    out = tmp_path / "s.json"
    with out.open("wb") as file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "skyroute.proxy.cli", "schema", stdout=file,
            stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
        async with asyncio.timeout(CALL_TIMEOUT_S * 3):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err
    return json.loads(out.read_text())


async def test_skyroute_schema_validates_the_demo_file_and_rejects_a_negative_timeout(tmp_path):
    """The printed schema accepts the demo's routing file (with its ${VAR}s) and refuses
    first_token_timeout: -5."""
    schema = await _skyroute_schema(tmp_path)
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    demo = yaml.safe_load(DEMO.read_text())
    assert list(validator.iter_errors(demo)) == []
    demo["upstreams"][0]["first_token_timeout"] = -5
    (error,) = validator.iter_errors(demo)
    assert list(error.absolute_path) == ["upstreams", 0, "first_token_timeout"]


def test_schema_accepts_string_forms_and_refuses_unknown_keys(tmp_path):
    """Durations, sizes and shares validate in their written forms; typos do not."""
    from skyroute.routing.schema import routing_json_schema

    validator = jsonschema.Draft7Validator(routing_json_schema())
    good = {"limits": {"max_body_bytes": "16MiB"}, "retry": {"budget": "20%"},
            "upstreams": [{"name": "a", "url": "http://h/v1", "connect_timeout": "250ms",
                           "max_connections": "${MAX_CONN:-64}"}],
            "routes": [{"model": "chat", "targets": ["a"], "hedge_after": "p95"}]}
    assert list(validator.iter_errors(good)) == []
    for bad in ({"upstreams": [{"name": "a", "url": "http://h", "regoin": "x"}]},
                {"upstreams": [{"name": "a", "url": "http://h", "idle_timeout": "-2s"}]},
                {"upstreams": []}):
        assert list(validator.iter_errors(bad)), bad


def test_helm_values_schema_routing_part_is_generated_from_the_model():
    """helm/values.schema.json's routing part is what the model generates (regenerate it
    with python -m skyroute.proxy.regenerate)."""
    committed = (REPO / HELM_VALUES_SCHEMA).read_text()
    assert helm_values_schema(committed) == committed, \
        "run: python -m skyroute.proxy.regenerate"


def test_readme_settings_table_is_generated_from_the_model():
    """README.md's settings table is what the model generates."""
    committed = (REPO / README).read_text()
    assert readme_with_table(committed) == committed, "run: python -m skyroute.proxy.regenerate"
