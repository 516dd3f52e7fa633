"""Nothing secret leaves: every answer, /health, /metrics and the whole log, after every error.

``skyroute run`` serves a routing file holding client keys, upstream keys, an admin
key and a sync token, in front of upstreams that echo the key they were sent in
their error text (as real APIs do: "Incorrect API key provided: sk-..."). Each
error path is driven; then every byte skyroute said, to clients and to its log,
is searched for every secret.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .conftest import CALL_TIMEOUT_S
from .hostile import raw_request

REPO = Path(__file__).resolve().parent.parent
CLIENT = "sk-client-SECRET-0a1b2c3d"
OTHER_CLIENT = "sk-client-SECRET-other-9z8y"
ADMIN = "admin-SECRET-5e6f7a8b"
SYNC = "sync-SECRET-token-1234abcd"
UPSTREAM_KEYS = {"u401": "sk-UPSTREAM-SECRET-456", "u500": "sk-UPSTREAM-SECRET-789",
                 "dead": "sk-UPSTREAM-SECRET-dead", "cut": "sk-UPSTREAM-SECRET-cut"}
SECRETS = [CLIENT, OTHER_CLIENT, ADMIN, SYNC, *UPSTREAM_KEYS.values()]


async def _echoing(request: web.Request) -> web.StreamResponse:
    """An upstream that quotes back the key and its own address in every error."""
    await request.read()
    key = request.headers.get("Authorization", "")
    where = f"{request.host} {request.transport.get_extra_info('sockname')}"  # type: ignore[union-attr]
    mode = request.match_info["mode"]
    if mode == "cut":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}'
                         b"\n\n")
        request.transport.abort()  # type: ignore[union-attr]
        return resp
    status = {"u401": 401, "u500": 500, "u429": 429}[mode]
    message = f"Incorrect API key provided: {key} at {where}"
    return web.json_response({"error": {"message": message, "type": "x", "code": key}},
                             status=status, headers={"Retry-After": "1"} if status == 429
                             else None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(echo_port: int, dead_port: int) -> str:
    def upstream(name: str, url: str) -> str:
        return (f"  - name: {name}\n    url: {url}\n    api_key: {UPSTREAM_KEYS[name]}\n"
                "    models: {chat: m, stream: m}\n")

    echo = f"http://127.0.0.1:{echo_port}"
    return (
        "listen: 127.0.0.1:0\n"
        f"auth:\n  api_keys:\n    - {{name: app, key: {CLIENT}}}\n"
        f"    - {{name: other, key: {OTHER_CLIENT}}}\n"
        f"admin: {{key: {ADMIN}}}\n"
        f"sync: {{token: {SYNC}, peers: ['ws://127.0.0.1:{dead_port}/sync']}}\n"
        "upstreams:\n"
        + upstream("u401", f"{echo}/u401/v1") + upstream("u500", f"{echo}/u500/v1")
        + upstream("dead", f"http://127.0.0.1:{dead_port}/v1")
        + upstream("cut", f"{echo}/cut/v1")
        + "routes:\n  - {model: chat, targets: [u401, u500, dead], max_attempts: 3}\n"
        "  - {model: stream, targets: [cut], max_attempts: 1}\n"
        "breaker: {consecutive_failures: 100}\n"
    )


@pytest.fixture
async def echo_upstream() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/{mode}/v1/chat/completions", _echoing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


class Run:
    """``skyroute run`` with its whole stderr (the log) collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log = bytearray()
        self.url = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log += line
            match = re.search(rb'"url": "(http://[^"]+)"', line)
            if match and not self.url.done():
                self.url.set_result(match.group(1).decode())

    async def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(CALL_TIMEOUT_S * 3):
            await self.proc.wait()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self._reader
        return self.log.decode(errors="replace")


async def test_no_secret_in_any_answer_health_metrics_or_log(tmp_path, echo_upstream):
    """After every error path, no configured secret (nor an upstream's echo of one, nor an
    upstream address) is in any answer, /health or /metrics; no secret is in the log."""
    dead_port = _free_port()
    path = tmp_path / "routing.yaml"
    path.write_text(_config(echo_upstream, dead_port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyroute.proxy.cli", "--log-format", "json", "--log-level",
        "debug", "run", "-c", str(path), cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ})
    run = Run(proc)
    answers: list[tuple[str, bytes]] = []
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S * 2):
            url = await run.url
        port = int(url.rsplit(":", 1)[1])
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        client = {"Authorization": f"Bearer {CLIENT}"}
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def call(method: str, where: str, **kwargs: object) -> None:
                async with http.request(method, f"{url}{where}", **kwargs) as resp:
                    answers.append((f"{method} {where} {resp.status}", await resp.read()))

            await call("POST", "/v1/chat/completions", json=chat, headers=client)  # all fail
            await call("POST", "/v1/chat/completions", json={**chat, "model": "stream",
                                                            "stream": True}, headers=client)
            await call("POST", "/v1/chat/completions", json=chat,
                       headers={"Authorization": "Bearer sk-wrong-key-guess"})
            await call("POST", "/v1/chat/completions", json=chat)
            await call("POST", "/v1/chat/completions", data=b"{not json", headers=client)
            for where in ("/health", "/metrics", "/livez", "/readyz", "/v1/models"):
                await call("GET", where, headers=client)
            await call("GET", "/admin/routing", headers=client)
            await call("GET", "/admin/routing", headers={"Authorization": f"Bearer {ADMIN}"})
            await call("GET", "/health", headers={"Authorization": f"Bearer {ADMIN}"})
            await call("GET", "/sync/sessions?token=wrong-token-guess")
        bad = await raw_request(port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                      f"Authorization: Bearer {CLIENT}\x01\r\nX: \x00")
        answers.append(("unparseable", bad.body))
        escape = await raw_request(port, f"GET /v1/%2e%2e/x HTTP/1.1\r\nHost: x\r\n"
                                         f"Authorization: Bearer {CLIENT}")
        answers.append(("path escape", escape.body))
    finally:
        log = await run.stop()

    assert len(answers) == 16
    assert any(b"stream_interrupted" in body for _, body in answers)
    for secret in [*SECRETS, "Incorrect API key"]:
        for what, body in answers:
            if what.startswith("GET /admin/routing 200") and secret == "Incorrect API key":
                continue
            assert secret.encode() not in body, f"{secret!r} in the answer to {what}"
        assert secret not in log, f"{secret!r} in the log"
    addresses = [f"127.0.0.1:{echo_upstream}", f"127.0.0.1:{dead_port}", str(echo_upstream)]
    for what, body in answers:
        if "admin" in what.lower() or b'"view": "admin"' in body:
            continue  # the admin views may name addresses (never secrets)
        for address in addresses:
            assert address.encode() not in body, f"{address!r} in the answer to {what}"
    public = json.loads(next(body for what, body in answers if what == "GET /health 200"))
    assert public["view"] == "public"
    assert public["upstreams"]["u401"]["state"] in ("bad_key", "healthy", "open")
    assert all("last_change" not in entry for entry in public["upstreams"].values())
