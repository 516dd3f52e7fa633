"""bench/server_floor.py --short runs: every row answers, (b) and (c) as (a) does, and every
row is counted; and its minimal Protocol server (bench/_passthrough.py --server protocol) keeps
HTTP/1.1's rules for what it does not serve. Only outcomes are asserted, never counts."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .conftest import CALL_TIMEOUT_S, UPSTREAM_KEY, run_script

BENCH = Path(__file__).resolve().parent.parent / "bench"
#: Four processes under valgrind on a shared 2-core machine: minutes, not seconds.
TIMEOUT_S = 540


@pytest.mark.skipif(not shutil.which("callgrind_control"), reason="needs valgrind")
@pytest.mark.timeout(TIMEOUT_S + 30)
async def test_server_floor_short_counts_every_row_after_checking_its_answers(tmp_path):
    """Each row answers a JSON and a streamed request ((b), (c) with (a)'s bytes), then is
    counted in both modes; the projection and the goal's verdict are printed."""
    result = tmp_path / "floor.json"
    returncode, out, err = await run_script(
        str(BENCH / "server_floor.py"), "--short", "--json", str(result), timeout_s=TIMEOUT_S)
    assert returncode == 0, err.decode()[-3000:]
    data = json.loads(result.read_text())
    rows = data["rows"]
    assert set(rows) == {"a", "b", "c", "d"}
    assert rows["a"]["check"] == "reference"
    assert rows["b"]["check"] == rows["c"]["check"] == "same answers as (a)"
    assert rows["d"]["check"] == "complete 200 answers"
    for name, row in rows.items():
        assert row["json"] > 0 and row["stream"] > 0, name
    assert set(data["summary"]) == {"json", "stream"}
    text = out.decode()
    assert "skyroute with a server like (c)" in text and "the 1.2x goal" in text


@pytest.fixture
async def protocol_passthrough(standin) -> AsyncIterator[int]:
    """The minimal Protocol server in front of a stand-in upstream; yields its port."""
    up = await standin("up", models=("deepseek-chat",))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH / "_passthrough.py"), up.base_url, UPSTREAM_KEY,
        "--client", "lean", "--server", "protocol", stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(CALL_TIMEOUT_S * 3):
            line = await proc.stdout.readline()
        yield int(json.loads(line)["url"].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await proc.wait()


async def _talk(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return await reader.read(-1)
    finally:
        writer.close()


def _post(body: bytes, extra: bytes = b"", path: bytes = b"/v1/chat/completions") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), extra, body))


async def test_protocol_passthrough_answers_pipelined_requests_in_order_and_closes_on_request(
        protocol_passthrough):
    """Two pipelined requests get two answers in order; ``Connection: close`` on the last
    gets ``Connection: close`` back and the connection ends after the answer."""
    body = json.dumps({"model": "deepseek-chat", "messages": [
        {"role": "user", "content": "hi"}]}).encode()
    stream = json.dumps({"model": "deepseek-chat", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}).encode()
    got = await _talk(protocol_passthrough,
                      _post(body) + _post(stream, b"Connection: close\r\n"))
    first, second = got.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b"Content-Type: application/json\r\n" in first and b'"choices"' in first
    assert b"Transfer-Encoding: chunked\r\n" in second and b"Connection: close\r\n" in second
    assert second.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


@pytest.mark.parametrize(("request_bytes", "status_line"), [
    (_post(b"", path=b"/v2/x", extra=b"Connection: close\r\n"), b"HTTP/1.1 404 Not Found\r\n"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
     b"HTTP/1.1 405 Method Not Allowed\r\n"),
    (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
     b"HTTP/1.1 505 HTTP Version Not Supported\r\n"),
    (b"\x00not http\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
])
async def test_protocol_passthrough_refuses_what_it_does_not_serve(
        protocol_passthrough, request_bytes, status_line):
    """A path outside /v1/, a method other than POST, HTTP/1.0 and bytes that are not HTTP
    each get an error status (with a Content-Length) rather than a hang or a reset."""
    got = await _talk(protocol_passthrough, request_bytes)
    assert got.startswith(status_line), got
    assert b"Content-Length: " in got
