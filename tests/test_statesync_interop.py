"""A stock Node ``yjs`` + ``y-websocket`` client against a real StateSync server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from skyroute.statesync import StateSync, SyncSettings

from .conftest import eventually

INTEROP = Path(__file__).parent / "interop"
TOKEN = "interop-token"


def _node_ready() -> str | None:
    """Return None when the Node client can run, else the reason to skip."""
    if shutil.which("node") is None:
        return "node is not installed"
    if (INTEROP / "node_modules" / "y-websocket").is_dir():
        return None
    if shutil.which("npm") is None:
        return "tests/interop/node_modules is missing and npm is not installed"
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent"],
        cwd=INTEROP,
        capture_output=True,
        timeout=180,
        check=False,
    )
    if done.returncode != 0:
        return f"npm install in tests/interop failed: {done.stderr.decode()[-300:]}"
    return None


@pytest.fixture
async def server() -> AsyncIterator[tuple[StateSync, int]]:
    reason = await asyncio.to_thread(_node_ready)
    if reason is not None:
        pytest.skip(reason)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sync = StateSync(SyncSettings(instance_id="py", token=TOKEN), registry=CollectorRegistry())
    app = web.Application()
    sync.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        await sync.start()
        yield sync, sock.getsockname()[1]
    finally:
        await sync.aclose()
        await runner.cleanup()
        sock.close()


async def _next_event(proc: asyncio.subprocess.Process, event: str) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        async with asyncio.timeout(10):
            line = await proc.stdout.readline()
        if not line:
            raise AssertionError(f"node client exited before {event!r}")
        message: dict[str, Any] = json.loads(line)
        if message["event"] == event:
            return message


async def test_yjs_client_reads_and_writes_sessions_map(server: tuple[StateSync, int]) -> None:
    """A y-websocket client sees a session pinned in Python, and Python sees its write."""
    sync, port = server
    sync.store.pin("from-python", "deepseek-eu", now=time.time())
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(INTEROP / "client.mjs"),
        f"ws://127.0.0.1:{port}/sync",
        TOKEN,
        "from-python",
        "from-node",
        cwd=INTEROP,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        read = await _next_event(proc, "read")
        assert read["upstream"] == "deepseek-eu"
        await _next_event(proc, "wrote")
        await eventually(lambda: sync.store.get("from-node", now=time.time()) is not None)
        got = sync.store.get("from-node", now=time.time())
        assert got is not None and got.upstream == "node-upstream"
        sync.store.pin("live", "u-live", now=time.time())
        remote = await _next_event(proc, "remote")
        assert remote == {"event": "remote", "id": "live", "upstream": "u-live"}
    finally:
        assert proc.stdin is not None
        proc.stdin.write(b"quit\n")
        await proc.stdin.drain()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
