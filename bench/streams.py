"""Benchmark: memory per held-open stream, and per-chunk cost as open streams grow.

Starts, on 127.0.0.1, a stand-in upstream that holds every SSE stream open
(``bench/_held_upstream.py``) and skyroute (``skyroute run --workers 1``, one route),
then opens streaming chat completions through skyroute from this process and keeps
them open, growing the number held open 1 -> 10 -> 100 -> 1,000 -> 10,000 (the streams
of one size stay open for the next). At each size it prints:

* skyroute's RSS, and its growth per open stream over the RSS before the first stream
  (and between this size and the last: the marginal cost of one more stream);
* skyroute's CPU per relayed chunk (utime+stime from /proc/PID/stat): the upstream
  writes one chunk on every open stream per tick, the next tick waits until this
  process has read them all, for at least ``--chunks`` chunks per size; with the ratio
  to the smallest size. A per-chunk cost that grows with the number of open streams
  would show here (a sweep over all connections per chunk, per-stream timers...).

Each stream is two sockets in skyroute (client and upstream): the top size is capped by
skyroute's open-file limit (the hard limit, which it raises its soft limit to) and
printed when it is. Goals (issue 14): memory per stream flat; per-chunk cost independent
of the number of open streams. Peak RSS (VmHWM) is printed against the 80 MB goal.

Usage: python bench/streams.py [--sizes 1 10 100 1000 10000] [--chunks 5000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import (  # noqa: E402  (bench/ is not a package)
    CLIENT_KEY,
    Procs,
    read_url_line,
    wait_for_listening,
)

#: Descriptors skyroute keeps for itself besides the two per stream.
FD_RESERVE = 200
OPEN_AT_ONCE = 100
TIMEOUT_S = 120.0
MARKER = b"data: "


def routing_yaml(upstream_url: str, max_streams: int) -> str:
    """One route to the held-open upstream; limits above the number of streams held."""
    cap = max_streams + 100
    return (f"listen: 127.0.0.1:0\n"
            f"auth:\n  api_keys:\n    - name: bench\n      key: {CLIENT_KEY}\n"
            f"limits:\n  max_client_connections: {cap}\n"
            f"upstreams:\n  - name: held\n    url: {upstream_url}\n"
            f"    api_key: sk-held\n    region: local\n    models: {{chat: deepseek-chat}}\n"
            f"    max_connections: {cap}\n    idle_timeout: 1h\n"
            f"routes:\n  - model: chat\n    targets: [held]\n    timeout: 1h\n")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` from /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


class Chunks:
    """Chunks read on every stream, and a wait for a total."""

    def __init__(self) -> None:
        self.total = 0
        self.target = math.inf
        self.reached = asyncio.Event()

    def add(self, n: int) -> None:
        self.total += n
        if self.total >= self.target:
            self.reached.set()

    async def wait_for(self, total: int) -> None:
        self.target = total
        self.reached.clear()
        if self.total >= total:
            return
        async with asyncio.timeout(TIMEOUT_S):
            await self.reached.wait()


class StreamClient(asyncio.Protocol):
    """One streaming request held open; counts the SSE events read on it."""

    def __init__(self, chunks: Chunks, request: bytes) -> None:
        self.chunks = chunks
        self.request = request
        self.tail = b""
        self.head: bytes | None = None
        self.first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            self.head = data[:12]
            if not data.startswith(b"HTTP/1.1 200"):
                self.first.set_exception(RuntimeError(f"skyroute answered {data[:300]!r}"))
                return
        buf = self.tail + data  # the tail is shorter than the marker: never counted twice
        found = buf.count(MARKER)
        self.tail = buf[-(len(MARKER) - 1):]
        if found:
            self.chunks.add(found)
            if not self.first.done():
                self.first.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.first.done():
            self.first.set_exception(RuntimeError(f"stream closed before content ({exc!r})"))


def request_bytes(port: int) -> bytes:
    body = json.dumps({"model": "chat", "stream": True, "messages": [
        {"role": "user", "content": "Say hello."}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Upstream:
    """Drives ``_held_upstream.py`` over its stdin/stdout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    async def command(self, word: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        return int(line.split()[1])


async def open_streams(clients: list[StreamClient], n: int, port: int, chunks: Chunks,
                       request: bytes) -> None:
    """Open streams until ``n`` are held, ``OPEN_AT_ONCE`` at a time, each until its first chunk."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def one() -> None:
        async with gate:
            _, client = await loop.create_connection(
                lambda: StreamClient(chunks, request), "127.0.0.1", port)
            async with asyncio.timeout(TIMEOUT_S):
                await client.first
            clients.append(client)

    await asyncio.gather(*(one() for _ in range(n - len(clients))))


def cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` (all its threads) has run, from /proc/PID/task/*/schedstat;
    finer than utime+stime's clock ticks, which a few thousand chunks barely move."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


@dataclass
class Row:
    streams: int
    open_s: float
    rss_kib: int
    per_stream_kib: float
    marginal_kib: float
    chunks: int
    us_per_chunk: float


async def measure(name: str, pid: int, port: int, upstream: Upstream, sizes: list[int],
                  args: argparse.Namespace) -> tuple[int, list[Row], str]:
    """Grow the streams held open through one proxy; (idle RSS, rows, closing line)."""
    request = request_bytes(port)
    chunks = Chunks()
    clients: list[StreamClient] = []
    # Warm up: one whole stream, so lazily built things are not counted per stream.
    await open_streams(clients, 1, port, chunks, request)
    await upstream.command("tick")
    await chunks.wait_for(2)
    await upstream.command("end")
    await asyncio.sleep(0.5)  # let the proxy finish the stream (and its access log line)
    clients.clear()
    chunks.total = 0
    idle = rss_kib(pid)
    rows: list[Row] = []
    last_n, last_rss = 0, idle
    for n in sizes:
        t0 = time.perf_counter()
        await open_streams(clients, n, port, chunks, request)
        opened_s = time.perf_counter() - t0
        await asyncio.sleep(0.5)  # the proxy's post-open work (logs, metrics) settles
        rss = rss_kib(pid)
        ticks = max(args.min_ticks, math.ceil(args.chunks / n))
        cpu0 = cpu_ns(pid)
        for _ in range(ticks):
            expected = chunks.total + await upstream.command("tick")
            await chunks.wait_for(expected)
        cpu = cpu_ns(pid) - cpu0
        rows.append(Row(n, opened_s, rss, (rss - idle) / n, (rss - last_rss) / (n - last_n),
                        ticks * n, cpu / (ticks * n) / 1e3))
        r = rows[-1]
        print(f"  {name:8} {n:>6} streams: RSS {rss / 1024:.1f} MiB, {r.per_stream_kib:.1f} "
              f"KiB/stream, {r.us_per_chunk:.1f} us/chunk", file=sys.stderr, flush=True)
        last_n, last_rss = n, rss
    lost = sum(c.closed for c in clients)
    await upstream.command("end")
    t0 = time.perf_counter()
    while sum(c.closed for c in clients) < len(clients) and time.perf_counter() - t0 < 60:
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    closing = (f"{name}: streams closed early {lost}; after all ended RSS "
               f"{rss_kib(pid) / 1024:.1f} MiB, peak (VmHWM) {rss_kib(pid, 'VmHWM') / 1024:.1f} "
               "MiB")
    return idle, rows, closing


async def run(args: argparse.Namespace, procs: Procs) -> list[str]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the children
    most = min(max(args.sizes), (hard - FD_RESERVE) // 2)
    sizes = sorted({min(s, most) for s in args.sizes})
    # Not Procs.spawn: it gives its children no stdin, and this one is driven through it.
    up_proc = subprocess.Popen([sys.executable, str(HERE / "_held_upstream.py")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               start_new_session=True)
    procs.procs.append(("held-upstream", up_proc))
    upstream = Upstream(up_proc)
    upstream_url = read_url_line(up_proc, "held upstream")
    out = [f"open-file limit {hard}: a proxy holds 2 descriptors per stream"]
    if most < max(args.sizes):
        out.append(f"  the top size is capped at {most} streams by that limit")
    results: dict[str, tuple[int, list[Row], str]] = {}
    for name in args.targets:
        if name == "bare":
            proc = procs.spawn("bare", [sys.executable, str(HERE / "_passthrough.py"),
                                        upstream_url, "sk-held"], core=None,
                               stdout=subprocess.PIPE)
            url = read_url_line(proc, "bare pass-through")
        else:
            config = procs.tmp / "routing.yaml"
            config.write_text(routing_yaml(upstream_url, most))
            log = procs.tmp / "skyroute.log"
            with log.open("wb") as log_file:
                proc = procs.spawn("skyroute", [
                    sys.executable, "-m", "skyroute.proxy.cli", "--log-format", "json",
                    "--log-level", args.log_level, "run", "-c", str(config), "--port", "0",
                    "--grace", "1", "--workers", "1"], core=None, stdout=subprocess.DEVNULL,
                    stderr=log_file)
            url = wait_for_listening(proc, log, None)
        port = int(url.rsplit(":", 1)[1])
        results[name] = await measure(name, proc.pid, port, upstream, sizes, args)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited during the run ({proc.returncode})")
        procs.stop_one(name)
    out.append("idle RSS (one stream served, none open): " + ", ".join(
        f"{name} {idle / 1024:.1f} MiB" for name, (idle, _, _) in results.items()))
    out.append(f"{'proxy':>8} {'streams':>7} {'open s':>7} {'RSS MiB':>8} {'KiB/stream':>11} "
               f"{'marginal':>9} {'chunks':>7} {'us/chunk':>9} {'vs smallest':>12}"
               + ("  KiB/stream, us/chunk vs bare" if len(results) > 1 else ""))
    bare_rows = {r.streams: r for r in results.get("bare", (0, [], ""))[1]}
    for name, (_, rows, _) in results.items():
        for r in rows:
            line = (f"{name:>8} {r.streams:>7} {r.open_s:>7.2f} {r.rss_kib / 1024:>8.1f} "
                    f"{r.per_stream_kib:>11.1f} {r.marginal_kib:>9.1f} {r.chunks:>7} "
                    f"{r.us_per_chunk:>9.1f} {r.us_per_chunk / rows[0].us_per_chunk:>11.2f}x")
            b = bare_rows.get(r.streams)
            if name != "bare" and b is not None:
                line += (f"  {r.per_stream_kib / b.per_stream_kib:>6.2f}x "
                         f"{r.us_per_chunk / b.us_per_chunk:>6.2f}x")
            out.append(line)
    out += [closing for _, _, closing in results.values()]
    out.append("goal (issue 14): peak RSS <= 80 MB per worker, idle and under load")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000, 10_000])
    ap.add_argument("--chunks", type=int, default=20_000,
                    help="at least this many chunks relayed per size (default 20,000)")
    ap.add_argument("--min-ticks", type=int, default=3,
                    help="at least this many ticks (a chunk on every stream) per size")
    ap.add_argument("--targets", nargs="+", choices=["bare", "skyroute"],
                    default=["bare", "skyroute"], help="proxies measured, in turn")
    ap.add_argument("--log-level", default="info", choices=["debug", "info"],
                    help="skyroute --log-level (default info, as in production)")
    ap.add_argument("--quick", action="store_true", help="sizes up to 1,000, 5,000 chunks")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.chunks = [s for s in args.sizes if s <= 1000], 5000
    procs = Procs()
    try:
        lines = uvloop.run(run(args, procs))
    finally:
        procs.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
