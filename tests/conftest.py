"""Shared fixtures: stand-in upstreams, a skyroute on port 0, routing files on disk."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog
from skyroute.proxy import Server, load_config
from skyroute.proxy.demo import StandinUpstream

CLIENT_KEY = "sk-client-test"
UPSTREAM_KEY = "sk-upstream-test"
#: Every network call a test makes is bounded by this.
CALL_TIMEOUT_S = 10.0


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], *,
                     timeout: float = 5.0, interval: float = 0.02) -> None:
    """Wait until ``predicate()`` holds, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
async def standin() -> AsyncIterator[Callable[..., Awaitable[StandinUpstream]]]:
    """Factory: ``await standin("name", ...)`` starts a stand-in upstream on port 0."""
    started: list[StandinUpstream] = []

    async def make(name: str, **kwargs: Any) -> StandinUpstream:
        kwargs.setdefault("api_key", UPSTREAM_KEY)
        up = StandinUpstream(name, **kwargs)
        await up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.aclose()


def upstream_yaml(up: StandinUpstream, *, region: str = "test", extra: str = "",
                  models: str = "{chat: deepseek-chat, embed: text-embedding-3-small}") -> str:
    """One ``upstreams`` entry pointing at a stand-in; ``extra`` adds keys to it."""
    lines = [f"  - name: {up.name}", f"    url: {up.base_url}", f"    api_key: {UPSTREAM_KEY}",
             f"    region: {region}", f"    models: {models}"]
    lines += ["    " + line for line in textwrap.dedent(extra).splitlines() if line.strip()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event logged during the test, with context variables merged in."""
    capture = structlog.testing.LogCapture()
    previous = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(**previous)


def routing_yaml(upstreams: list[str], routes: str = "", *, auth: bool = True,
                 extra: str = "") -> str:
    """A whole routing file from ``upstream_yaml`` entries and a routes block."""
    auth_block = f"auth:\n  api_keys:\n    - name: tests\n      key: {CLIENT_KEY}\n" if auth else ""
    routes_block = "routes:\n" + textwrap.indent(textwrap.dedent(routes), "  ") if routes else ""
    return (f"listen: 127.0.0.1:0\n{auth_block}{textwrap.dedent(extra)}upstreams:\n"
            + "".join(upstreams) + routes_block)


async def run_script(*argv: str, timeout_s: float) -> tuple[int, bytes, bytes]:
    """Run ``python argv...`` to its end within ``timeout_s`` (killed past it); returns its
    exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.fixture
async def skyroute(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Factory: ``await skyroute(yaml_text)`` serves that routing file on port 0."""
    servers: list[Server] = []

    async def make(text: str, *, watch: bool = True, grace_s: float = 5.0,
                   clock: Callable[[], float] = time.monotonic) -> Server:
        """``clock``: what routing reads the time from, e.g. ``FakeClock().now``."""
        path = tmp_path / f"routing-{len(servers)}.yaml"
        path.write_text(text)
        server = Server(load_config(path), config_path=path if watch else None, port=0,
                        grace_s=grace_s, clock=clock)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.aclose()


def client_for(server: Server, key: str = CLIENT_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
    """The official SDK pointed at ``server``, with retries off so tests see every answer."""
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", CALL_TIMEOUT_S)
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, **kwargs)


async def served_by(client: openai.AsyncOpenAI, n: int, *, concurrency: int = 8) -> Counter[str]:
    """Send n chat requests for ``chat``; count which stand-in answered each."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with sem:
            reply = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
            return reply.choices[0].message.content.split()[2]  # "Hello from <name> ..."

    return Counter(await asyncio.gather(*(one() for _ in range(n))))
