"""The fleet bench/regions.py measures: three peered skyroutes in namespaces, and its views.

``fleet_running`` makes the namespaces, starts the delay line, each region's stand-in
upstream and ``skyroute run`` (see ``_regions_net`` for the network), waits until every
instance is linked to both others, and removes all of it afterwards (also after an
error or a cancellation). A ``Region`` is the bench's direct line to one instance (HTTP
through sockets made in its namespace, no delay); its ``Observer`` is a Yjs client on
that instance's ``sessions`` document, noting when each session first appeared there
and its pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _regions_net import SKYROUTE_PORT, STANDIN_PORT, UPSTREAM_KEY, Namespaces
from prometheus_client.parser import text_string_to_metric_families
from pycrdt import Doc, Map, YMessageType, create_sync_message, handle_sync_message

BENCH = Path(__file__).resolve().parent
REGIONS = ("r1", "r2", "r3")
KEY, LIMITED_KEY, SYNC_TOKEN = "sk-regions", "sk-regions-limited", "regions-sync-token"
RPM = 60
#: Links per instance in the full mesh: two peers x two documents (sessions, usage).
LINKS = 2 * (len(REGIONS) - 1)
START_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 30.0
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def routing_file(region: str, rotate_every_s: float | None = None) -> str:
    """Region ``region``'s routing file: its own upstream first, the mesh to the others."""
    index = REGIONS.index(region)
    order = [region, *[r for r in REGIONS if r != region]]
    upstreams = "".join(
        f"  - name: up-{r}\n"
        f"    url: http://127.0.0.1:{STANDIN_PORT if r == region else STANDIN_PORT + i + 1}/v1\n"
        f"    api_key: {UPSTREAM_KEY}\n    region: {r}\n    models: {{chat: deepseek-chat}}\n"
        for i, r in enumerate(REGIONS))
    peers = ", ".join(f"ws://127.0.0.1:{SKYROUTE_PORT + i + 1}/sync"
                      for i, r in enumerate(REGIONS) if i != index)
    return (f"# bench/regions.py, region {region}\n"
            f"listen: 127.0.0.1:{SKYROUTE_PORT}\ninstance:\n  id: {region}\n"
            f"auth:\n  api_keys:\n    - name: bench\n      key: {KEY}\n"
            f"    - name: limited\n      key: {LIMITED_KEY}\n      rpm: {RPM}\n"
            f"upstreams:\n{upstreams}"
            f"routes:\n  - model: chat\n    targets: [{', '.join(f'up-{r}' for r in order)}]\n"
            # priority: each region's own upstream first. A 10 s threshold: a pin to an
            # upstream across the line (up to 152 ms away, more on a loaded machine) is
            # followed, never moved for slowness; what is measured is the race between pins.
            "    strategy: priority\n    latency_threshold: 10s\n"
            f"sync:\n  token: {SYNC_TOKEN}\n  peers: [{peers}]\n"
            + (f"  rotate_every: {rotate_every_s:g}s\n" if rotate_every_s else ""))


class Observer:
    """A Yjs client on one region's ``/sync/sessions``: when each session appeared, its pin.

    A rotation closes a Yjs client's connection (code 4000); it reconnects at once with
    a fresh document, whose first sync brings every live session again (a session keeps
    the time it was first seen).
    """

    def __init__(self, region: str) -> None:
        self.region = region
        self.first_seen: dict[str, float] = {}
        self.upstream: dict[str, str] = {}
        self.changed = asyncio.Event()
        self.connections = 0
        self._task: asyncio.Task[None] | None = None

    def _on_change(self, event: Any) -> None:
        now = time.monotonic()
        for key, change in event.keys.items():
            value = change.get("newValue")
            if isinstance(value, dict) and value.get("upstream"):
                self.first_seen.setdefault(key, now)
                self.upstream[key] = value["upstream"]
        self.changed.set()

    async def run(self, http: aiohttp.ClientSession) -> None:
        """Follow the document until cancelled, reconnecting whenever the link closes."""
        url = f"http://127.0.0.1:{SKYROUTE_PORT}/sync/sessions"
        while True:
            doc = Doc()
            sessions: Map[Any] = doc.get("sessions", type=Map)
            sub = sessions.observe(self._on_change)
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.ws_connect(url, params={"token": SYNC_TOKEN},
                                           heartbeat=None) as ws:
                    self.connections += 1
                    await ws.send_bytes(create_sync_message(doc))
                    async for msg in ws:
                        if (msg.type == aiohttp.WSMsgType.BINARY
                                and msg.data[0] == YMessageType.SYNC
                                and (reply := handle_sync_message(msg.data[1:], doc))):
                            await ws.send_bytes(reply)
            sessions.unobserve(sub)
            await asyncio.sleep(0.01)

    def start(self, http: aiohttp.ClientSession) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(http))
        return self._task

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after a change; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self._task is not None and self._task.done():
                raise RuntimeError(f"the observer of {self.region} stopped: "
                                   f"{self._task.exception()!r}")
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.changed.wait()
        return True


@dataclass
class Region:
    name: str
    http: aiohttp.ClientSession
    observer: Observer
    pid: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{SKYROUTE_PORT}"

    async def chat(self, *, key: str = KEY, session: str | None = None) -> tuple[int, str]:
        """One chat completion: its status and the upstream that answered (or '')."""
        headers = {"Authorization": f"Bearer {key}"}
        if session is not None:
            headers["X-Session-ID"] = session
        async with self.http.post(f"{self.url}/v1/chat/completions", json=BODY,
                                  headers=headers) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Skyroute-Upstream", "")

    async def metrics(self) -> dict[str, float]:
        """The samples this bench reads from ``/metrics``, summed over labels it ignores."""
        async with self.http.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = {"bytes_out": 0.0, "peers_connected": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "skyroute_sync_bytes_total"
                        and sample.labels.get("direction") == "out"):
                    out["bytes_out"] += sample.value
                elif sample.name == "skyroute_sync_peers_connected":
                    out["peers_connected"] += sample.value
        return out

    async def links_connected(self) -> int:
        """How many of this instance's peer links ``/health`` shows as connected."""
        async with self.http.get(f"{self.url}/health") as resp:
            peers = (await resp.json())["peers"]
        states = peers.values() if isinstance(peers, dict) else peers
        return sum(1 for s in states if s == "connected")

    def cpu_s(self) -> float:
        """CPU time (user + system) of this region's skyroute process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Fleet:
    ns: Namespaces
    delays: dict[str, float]
    workdir: Path
    rotate_every_s: float | None = None
    regions: dict[str, Region] = field(default_factory=dict)
    line: asyncio.subprocess.Process | None = None

    async def delay_line(self, verb: str, region: str) -> None:
        """``cut`` or ``heal`` every door into and out of ``region``."""
        assert self.line is not None and self.line.stdin and self.line.stdout
        self.line.stdin.write(f"{verb} {region}\n".encode())
        await self.line.stdin.drain()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            answer = await self.line.stdout.readline()
        if answer.strip() != b"ok":
            raise RuntimeError(f"the delay line answered {answer!r} to {verb} {region}")


async def _spawn(argv: list[str], log: Path, stack: contextlib.AsyncExitStack, *,
                 pipes: bool = False) -> asyncio.subprocess.Process:
    """Start ``argv`` in a session of its own; stopped (TERM, then KILL) when ``stack`` closes."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else out, stderr=out,
            start_new_session=True)

    async def stop() -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    stack.push_async_callback(stop)
    return proc


async def _ready_line(proc: asyncio.subprocess.Process, log: Path, what: str) -> None:
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            line = await proc.stdout.readline()
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        raise RuntimeError(f"{what} did not start; its log ({log}):\n{log.read_text()[-3000:]}")


async def until(predicate: Callable[[], Any], timeout: float, what: str,
                 interval: float = 0.05) -> float:
    """Poll an async ``predicate`` until true; the seconds it took. Raises after ``timeout``."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            if await predicate():
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def fleet_running(delays: dict[str, float], workdir: Path, ttft_s: float,
                        rotate_every_s: float | None) -> AsyncIterator[Fleet]:
    """Namespaces, delay line, stand-ins, three peered skyroutes; all removed afterwards."""
    ns = Namespaces.for_regions(list(REGIONS))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(ns.delete)  # last out: after every process in them has stopped
        ns.create()
        fleet = Fleet(ns=ns, delays=delays, workdir=workdir, rotate_every_s=rotate_every_s)
        log = workdir / "delay-line.log"
        fleet.line = await _spawn(
            [sys.executable, str(BENCH / "_regions_net.py"), "delay-line",
             "--names", json.dumps(ns.names), "--delays", json.dumps(delays)],
            log, stack, pipes=True)
        await _ready_line(fleet.line, log, "the delay line")
        standins = {}
        for region in REGIONS:
            log = workdir / f"standin-{region}.log"
            standins[region] = log, await _spawn(
                ns.command(region, sys.executable, str(BENCH / "_regions_net.py"), "standin",
                           "--name", f"up-{region}", "--ttft", str(ttft_s)),
                log, stack, pipes=True)
        await asyncio.gather(*(_ready_line(proc, log, f"the stand-in of {region}")
                               for region, (log, proc) in standins.items()))
        procs = {}
        for region in REGIONS:
            path = workdir / f"routing-{region}.yaml"
            path.write_text(routing_file(region, rotate_every_s))
            procs[region] = await _spawn(ns.command(
                region, sys.executable, "-m", "skyroute.proxy.cli", "--log-level", "warning",
                "--log-format", "json", "run", "-c", str(path), "--workers", "1", "--grace", "1"),
                workdir / f"skyroute-{region}.log", stack)
        for region in REGIONS:
            def in_region(addr_info: Any, region: str = region) -> Any:
                return ns.socket(region, *addr_info[:3])
            http = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(socket_factory=in_region, limit=0),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)))
            fleet.regions[region] = Region(region, http, Observer(region), procs[region].pid)
        for region in fleet.regions.values():
            async def peered(r: Region = region) -> bool:
                if procs[r.name].returncode is not None:
                    raise RuntimeError(f"skyroute in {r.name} exited; see "
                                       f"{workdir / f'skyroute-{r.name}.log'}")
                return await r.links_connected() == LINKS
            await until(peered, START_TIMEOUT_S, f"skyroute in {region.name} peered")
        observers = [r.observer.start(r.http) for r in fleet.regions.values()]

        async def stop_observers() -> None:
            for task in observers:
                task.cancel()
            await asyncio.gather(*observers, return_exceptions=True)

        stack.push_async_callback(stop_observers)
        yield fleet
