"""The openai Node SDK streams Responses through skyroute as it does directly."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, UPSTREAM_KEY, routing_yaml
from .conftest import upstream_yaml as entry

INTEROP = Path(__file__).parent / "interop"
MODELS = "{chat: deepseek-chat}"


def _node_sdk_ready() -> str | None:
    """None when the Node SDK can run, else the reason to skip."""
    if shutil.which("node") is None:
        return "node is not installed"
    if (INTEROP / "node_modules" / "openai").is_dir():
        return None
    if shutil.which("npm") is None:
        return "tests/interop/node_modules is missing and npm is not installed"
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"],
                          cwd=INTEROP, capture_output=True, timeout=180, check=False)
    if done.returncode != 0:
        return f"npm install in tests/interop failed: {done.stderr.decode()[-300:]}"
    return None


async def node_responses_stream(base_url: str, key: str, model: str) -> dict[str, Any]:
    reason = await asyncio.to_thread(_node_sdk_ready)
    if reason is not None:
        pytest.skip(reason)
    proc = await asyncio.create_subprocess_exec(
        "node", "responses_stream.mjs", base_url, key, model, cwd=INTEROP,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(CALL_TIMEOUT_S * 2):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_node_sdk_responses_stream_same_directly_and_through_skyroute(standin, skyroute):
    """The Node SDK sees the same Responses events and text through skyroute as directly."""
    up = await standin("a", models=("deepseek-chat",))
    server = await skyroute(routing_yaml([entry(up, models=MODELS)]))
    direct = await node_responses_stream(up.base_url, UPSTREAM_KEY, "deepseek-chat")
    through = await node_responses_stream(f"{server.url}/v1", CLIENT_KEY, "chat")
    assert direct["error"] is None and direct["text"] == "Hello from a t3 t4"
    assert through == direct


async def test_node_sdk_sees_a_cut_responses_stream_as_an_error(standin, skyroute):
    """A Responses stream cut part-way ends in an `error` event for the Node SDK."""
    up = await standin("a", models=("deepseek-chat",))
    up.behaviour.mode = "reset_midstream"
    server = await skyroute(routing_yaml([entry(up, models=MODELS)]))
    through = await node_responses_stream(f"{server.url}/v1", CLIENT_KEY, "chat")
    assert through["types"][-1] == "error"
    assert through["error"] == "stream_interrupted"
    assert "response.completed" not in through["types"]
