"""``skyroute run --workers 2`` as a user runs it: one port, two processes, one state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from skyroute.proxy.demo import StandinUpstream

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, eventually, routing_yaml
from .conftest import upstream_yaml as entry

REPO = Path(__file__).resolve().parent.parent
LIMITED_KEY = "sk-limited-workers"
RPM = 8
MESSAGES = [{"role": "user", "content": "hi"}]


class Workers:
    """A running ``skyroute run --workers 2`` whose JSON log is read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.url = ""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:  # drained always, so no worker blocks on a full pipe
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "not_json", "line": line.decode(errors="replace")})

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())]

    async def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        await eventually(lambda: self.find(event, **fields), timeout=CALL_TIMEOUT_S * 2)
        return self.find(event, **fields)[-1]

    def worker_pids(self) -> set[int]:
        """The pids of the workers that are running now, by the supervisor's log."""
        current: dict[int, int] = {}
        for e in self.events:
            if e.get("event") == "worker_started":
                current[e["worker"]] = e["pid"]
        return set(current.values())

    async def served_by(self, request_id: str) -> int:
        """The pid of the worker that logged ``request_id``'s access-log line."""
        line = await self.wait_for("request_finished", request_id=request_id)
        return int(line["pid"])

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(CALL_TIMEOUT_S * 3):
            code = await self.proc.wait()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self._reader
        return code


@pytest.fixture
async def workers(standin, tmp_path) -> AsyncIterator[tuple[Workers, Path, StandinUpstream]]:
    """``skyroute run --workers 2`` in front of one stand-in, with a key limited to RPM."""
    up = await standin("solo")
    path = tmp_path / "routing.yaml"
    text = routing_yaml([entry(up, models="{chat: deepseek-chat}")]).replace(
        "auth:\n  api_keys:\n",
        f"auth:\n  api_keys:\n    - name: limited\n      key: {LIMITED_KEY}\n      rpm: {RPM}\n")
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyroute.proxy.cli", "--log-format", "json", "run", "-c",
        str(path), "--workers", "2", "--grace", "5", cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    running = Workers(proc)
    try:
        started = await running.wait_for("workers_started")
        running.url = started["url"]
        yield running, path, up
    finally:
        for pid in running.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await running._reader


def _new_connections() -> aiohttp.TCPConnector:
    """A connection per request, so the kernel picks a worker for each anew."""
    return aiohttp.TCPConnector(force_close=True)


async def _chat(url: str, *, key: str = CLIENT_KEY) -> tuple[int, str]:
    """One chat request on a new connection (so the kernel picks a worker anew)."""
    request_id = uuid.uuid4().hex
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with (aiohttp.ClientSession(timeout=timeout, connector=_new_connections()) as http,
                http.post(f"{url}/v1/chat/completions",
                          json={"model": "chat", "messages": MESSAGES},
                          headers={"Authorization": f"Bearer {key}",
                                   "X-Request-ID": request_id}) as resp):
        await resp.read()
        return resp.status, request_id


async def _spread(running: Workers, n: int) -> set[int]:
    pids = set()
    for _ in range(n):
        status, request_id = await _chat(running.url)
        assert status == 200
        pids.add(await running.served_by(request_id))
    return pids


async def _requests_in_metrics(url: str) -> float:
    """skyroute_requests_total (status 200) from one scrape, on a new connection."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with (aiohttp.ClientSession(timeout=timeout, connector=_new_connections()) as http,
                http.get(f"{url}/metrics") as resp):
        text = await resp.text()
    assert re.search(r"^skyroute_instance_info\{[^}]*\} 1\.0$", text, re.M)
    return sum(float(m.group(1)) for m in re.finditer(
        r'^skyroute_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.M))


async def test_workers_share_the_port_and_a_dead_worker_is_restarted(workers):
    """Requests spread over both workers and /metrics on either counts them all; a worker
    killed is restarted, and requests keep working meanwhile."""
    running, _, _ = workers
    pids = running.worker_pids()
    assert len(pids) == 2
    assert await _spread(running, 24) == pids

    async def all_counted() -> bool:  # each worker writes its counts every tick (50 ms)
        return await _requests_in_metrics(running.url) == 24

    await eventually(all_counted, timeout=CALL_TIMEOUT_S)
    for _ in range(6):  # new connections: the scrapes land on both workers
        assert await _requests_in_metrics(running.url) == 24

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    await running.wait_for("worker_exited", pid=victim)
    assert await _spread(running, 4) == pids - {victim}  # the survivor serves meanwhile
    await eventually(lambda: len(running.worker_pids() - pids) == 1, timeout=CALL_TIMEOUT_S)
    fresh = running.worker_pids()
    assert victim not in fresh

    async def both_serve() -> bool:
        return await _spread(running, 4) == fresh

    await eventually(both_serve, timeout=CALL_TIMEOUT_S)


async def test_sighup_reloads_every_worker_and_sigterm_drains_them_all(workers):
    """SIGHUP reaches both workers; SIGTERM lets a request in flight finish and leaves no
    process behind."""
    running, path, up = workers
    pids = running.worker_pids()
    path.write_text(path.read_text().replace("{chat: deepseek-chat}",
                                             "{chat: deepseek-chat, other: deepseek-chat}"))
    running.proc.send_signal(signal.SIGHUP)
    for pid in pids:
        await running.wait_for("config_reloaded", pid=pid)

    up.behaviour.ttft_s = 1.0  # the next answer is slow: in flight when SIGTERM comes
    in_flight = asyncio.create_task(_chat(running.url))
    await eventually(lambda: up.in_flight == 1, timeout=CALL_TIMEOUT_S)
    assert await running.stop() == 0
    assert (await in_flight)[0] == 200  # drained: answered before its worker exited
    assert running.find("shutdown_started")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie_of_someone_else(pid)


def _is_zombie_of_someone_else(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(re.search(r"State:\s+Z", status))


async def test_rpm_limit_counts_requests_on_every_worker(workers):
    """rpm counts across workers: the key is refused after about RPM requests in all, not RPM
    per worker. (Each worker admits within its share of the rpm, and a share moves to the
    worker that wants it only once unused: one worker may refuse while the other still holds
    a unit, so requests go on until both refused and the rpm is reached.)"""
    running, _, _ = workers
    served: dict[int, int] = {}
    refused: set[int] = set()

    async def both_refuse() -> bool:
        status, request_id = await _chat(running.url, key=LIMITED_KEY)
        pid = await running.served_by(request_id)
        if status == 200:
            served[pid] = served.get(pid, 0) + 1
        else:
            assert status == 429
            refused.add(pid)
        return len(refused) == 2 and sum(served.values()) >= RPM

    await eventually(both_refuse, timeout=CALL_TIMEOUT_S * 2)
    assert len(served) == 2  # both workers admitted some (else this shows nothing)
    # Counted per worker, the key would get RPM on each (2 * RPM); shared, RPM plus what
    # arrived while the last count was still on its way (well under RPM).
    assert RPM <= sum(served.values()) < 2 * RPM


async def _metrics_text(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with (aiohttp.ClientSession(timeout=timeout, connector=_new_connections()) as http,
                http.get(f"{url}/metrics") as resp):
        return await resp.text()


async def test_reload_removing_a_key_leaves_no_share_value_and_no_warning(workers):
    """Under --workers prometheus_client cannot delete a series: a reload that removes a
    key with an rpm leaves its skyroute_rate_limit_share reading NaN on every worker (not
    its last share), and no worker logs prometheus_client's "not implemented in
    multi-process mode" warning (metrics that are set anew each tick did, once each)."""
    running, path, _ = workers
    pids = running.worker_pids()
    share = re.compile(r'^skyroute_rate_limit_share\{key="limited",pid="(\d+)"\} (\S+)$', re.M)

    async def shared_on_both() -> bool:
        values = dict(share.findall(await _metrics_text(running.url)))
        return {int(p) for p in values} >= pids and "NaN" not in values.values()

    await eventually(shared_on_both, timeout=CALL_TIMEOUT_S)
    path.write_text(re.sub(r"    - name: limited\n.*\n.*\n", "", path.read_text()))
    running.proc.send_signal(signal.SIGHUP)
    for pid in pids:
        await running.wait_for("config_reloaded", pid=pid)

    async def no_value_on_either() -> bool:
        values = dict(share.findall(await _metrics_text(running.url)))
        return all(values.get(str(pid)) == "NaN" for pid in pids)

    await eventually(no_value_on_either, timeout=CALL_TIMEOUT_S)
    assert await running.stop() == 0
    warned = [e for e in running.events if "multi-process mode" in json.dumps(e)]
    assert not warned
