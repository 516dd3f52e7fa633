"""Benchmark: CPU per request of skyroute's upstream leg, lean client against aiohttp's.

The upstream leg alone: one process sends chat completions, one after another on
one keep-alive connection, to the stand-in upstream (``bench/_upstream.py``, its
own process) and reads each answer whole, once with aiohttp's ``ClientSession``
set up as skyroute set it up before (its own connector, ``auto_decompress`` off,
a ``ClientTimeout`` with connect and sock_read) and once with
``proxy._upstream_http.UpstreamPool`` (what ``proxy._forward`` uses now for plain
OpenAI-compatible upstreams). Rounds alternate between the two so that a busy
moment on the machine hits both; printed is the median CPU time of this process
(user + system, ``time.process_time``) per request and the ratio lean / aiohttp.

Usage: python bench/upstream_client.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from multidict import CIMultiDict

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import UPSTREAM_KEY, body_for, read_url_line  # noqa: E402
from skyroute.proxy._upstream_http import UpstreamPool  # noqa: E402

Send = Callable[[bytes], Awaitable[bytes]]


def _headers() -> CIMultiDict[str]:
    return CIMultiDict({"Content-Type": "application/json", "Accept-Encoding": "identity",
                        "Authorization": f"Bearer {UPSTREAM_KEY}", "X-Request-ID": "0" * 32})


async def _read_all(content: Any) -> bytes:
    """The whole body from aiohttp's or the lean client's ``content`` (both have readany)."""
    parts = []
    while chunk := await content.readany():
        parts.append(chunk)
    return b"".join(parts)


async def _round(send: Send, body: bytes, count: int) -> float:
    """CPU seconds per request over ``count`` requests."""
    start = time.process_time()
    for _ in range(count):
        await send(body)
    return (time.process_time() - start) / count


async def main(requests: int, rounds: int) -> None:
    proc = subprocess.Popen([sys.executable, str(HERE / "_upstream.py"), UPSTREAM_KEY],
                            stdout=subprocess.PIPE)
    try:
        base = read_url_line(proc, "the stand-in upstream")
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, keepalive_timeout=30),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        pool = UpstreamPool(256, keepalive_s=30)
        url = base + "/chat/completions"

        async def via_aiohttp(body: bytes) -> bytes:
            response = await session.request("POST", url, data=body, headers=_headers(),
                                             timeout=timeout, allow_redirects=False)
            try:
                return await _read_all(response.content)
            finally:
                response.release()

        async def via_lean(body: bytes) -> bytes:
            response = await pool.request("POST", base, "/chat/completions", _headers(), body,
                                          connect_s=10, idle_s=60)
            try:
                return await _read_all(response.content)
            finally:
                response.close()

        clients: dict[str, Send] = {"aiohttp": via_aiohttp, "lean": via_lean}
        print(f"upstream leg only: {requests} requests per round, {rounds} rounds, "
              "one keep-alive connection; CPU time of the client process")
        print("| mode | aiohttp µs/req | lean µs/req | lean / aiohttp |")
        print("|---|---|---|---|")
        try:
            for mode in ("json", "stream"):
                body = body_for("deepseek-chat", mode == "stream")
                for send in clients.values():  # warm-up: connections, caches
                    assert await send(body)
                    await _round(send, body, requests // 10)
                cpu: dict[str, list[float]] = {name: [] for name in clients}
                for _ in range(rounds):
                    for name, send in clients.items():
                        cpu[name].append(await _round(send, body, requests))
                old, new = (statistics.median(cpu[n]) * 1e6 for n in ("aiohttp", "lean"))
                print(f"| {mode} | {old:.1f} | {new:.1f} | {new / old:.2f}x |", flush=True)
        finally:
            await session.close()
            pool.close()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per client and mode")
    args = parser.parse_args()
    uvloop.run(main(args.requests, args.rounds))
