"""deploy/local-multiregion.sh end to end, run as a user runs it.

The script starts three stand-in regions, a stand-in GPU pool, two peered skyroute
instances and a real Prometheus; the test reads the URLs it prints, talks to both
instances with the openai SDK, makes an upstream slow through the stand-ins' control
endpoint and watches the instances learn it from Prometheus. It runs the script in a
process group of its own, so after SIGTERM it can check that nothing (Prometheus
above all) was left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from skyroute.proxy.demo import PrometheusNotFound, find_prometheus

from .conftest import CALL_TIMEOUT_S, eventually

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "local-multiregion.sh"
MESSAGES = [{"role": "user", "content": "hi"}]
#: The demo's GPU pool (upstream ``local-gpu``): the chat route's fastest upstream, so the
#: one that has traffic to lose when it gets slow.
POOL, POOL_SERVERS = "local-gpu", ("gpu-a", "gpu-b")
SLOW_S = 0.4
# Generous bounds: the machine has 2 cores shared with other test runs, and Prometheus
# needs a couple of scrapes and a 1m rate window to say anything.
START_TIMEOUT_S = 120.0
CHANGE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Demo:
    """The running script and what it printed."""

    proc: asyncio.subprocess.Process
    key: str
    a: str  # the first skyroute instance's URL
    b: str  # its peer's
    prometheus: str
    routing_query: str  # the PromQL the instances read upstream latency with
    controls: dict[str, str]  # stand-in name -> its control URL


def _parse(out: str, proc: asyncio.subprocess.Process) -> Demo | None:
    """The URLs from the printed instructions, or None while they are not all there."""
    if "Ctrl-C stops everything." not in out:
        return None
    first = re.search(r"serving on (http://\S+)", out)
    peer = re.search(r"peered, serving on (http://\S+)", out)
    key = re.search(r"Bearer (sk-[\w-]+)", out)
    prometheus = re.search(r"^Prometheus UI: (http://\S+)", out, flags=re.M)
    query = re.search(r"PromQL to paste.*\n +(.+)$", out, flags=re.M)
    controls = dict(re.findall(r"^ +([\w-]+) +(http://\S+/_standin/behaviour)$", out,
                               flags=re.M))
    assert first and peer and key and prometheus and query, out
    return Demo(proc=proc, key=key.group(1), a=first.group(1), b=peer.group(1),
                prometheus=prometheus.group(1), routing_query=query.group(1), controls=controls)


def _needs_prometheus() -> None:
    """Skip without a prometheus binary, except under CI=true, where it must run (and fail)."""
    try:
        find_prometheus()
    except PrometheusNotFound as exc:
        if os.environ.get("CI") != "true":
            pytest.skip(f"the prometheus binary is missing (under CI=true this test runs and "
                        f"fails): {exc}")


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    """``deploy/local-multiregion.sh --port 0``, started and parsed; killed if left running."""
    _needs_prometheus()
    # The skyroute next to this interpreter, so the script runs the code under test.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), "--port", "0", stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=err, start_new_session=True, env={**os.environ, "PATH": path},
            cwd=tmp_path)
    try:
        parsed: list[Demo] = []

        def printed() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"the script exited with {proc.returncode}:\n"
                                     f"{out_path.read_text()}\n{err_path.read_text()[-3000:]}")
            found = _parse(out_path.read_text(), proc)
            parsed.extend([found] if found else [])
            return found is not None

        await eventually(printed, timeout=START_TIMEOUT_S, interval=0.1)
        yield parsed[0]
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the test left running
            os.killpg(proc.pid, signal.SIGKILL)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await proc.wait()


async def _json(http: aiohttp.ClientSession, url: str, **params: str) -> dict:
    async with http.get(url, params=params) as resp:
        assert resp.status == 200, (url, resp.status, await resp.text())
        return await resp.json()


async def _upstream_of(client: openai.AsyncOpenAI, model: str = "chat",
                       session: str | None = None) -> str:
    """Send one request; the upstream that served it (``X-Skyroute-Upstream``)."""
    headers = {"X-Session-ID": session} if session else {}
    if model == "embed":
        raw = await client.embeddings.with_raw_response.create(
            model=model, input="hi", extra_headers=headers)
        assert raw.parse().data[0].embedding
    else:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, extra_headers=headers)
        assert raw.parse().choices[0].message.content.startswith("Hello from")
    return raw.headers["X-Skyroute-Upstream"]


async def _served(client: openai.AsyncOpenAI, n: int, *, concurrency: int = 4) -> Counter:
    """Send ``n`` chat requests; count the upstreams that served them."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with sem:
            return await _upstream_of(client)

    return Counter(await asyncio.gather(*(one() for _ in range(n))))


async def _peers_connected(http: aiohttp.ClientSession, demo: Demo) -> bool:
    for url in (demo.a, demo.b):
        peers = (await _json(http, f"{url}/health"))["peers"]
        if not peers or set(peers) != {"connected"}:
            return False
    return True


async def _prometheus_has_scraped(http: aiohttp.ClientSession, demo: Demo,
                                  a: openai.AsyncOpenAI) -> bool:
    """Prometheus has both instances up, request counters from each, and a pool p95.

    Each check sends a few requests through A first: ``rate()`` needs a counter that grows
    between scrapes, and the pool's p95 (the routing query) must be known before it gets
    slow, or A would notice the slowness from its own traffic first and stop sending
    there before Prometheus saw enough of it.
    """
    await _served(a, 4)
    query = f"{demo.prometheus}/api/v1/query"
    up = (await _json(http, query, query='up{job="skyroute"} == 1'))["data"]["result"]
    counted = (await _json(http, query, query="sum by (instance) (skyroute_requests_total)")
               )["data"]["result"]
    p95 = (await _json(http, query, query=demo.routing_query))["data"]["result"]
    pool = [s["value"][1] for s in p95 if s["metric"].get("upstream") == POOL]
    return len(up) == 2 and len(counted) == 2 and pool not in ([], ["NaN"])


async def _session_kept_across_instances(a: openai.AsyncOpenAI, b: openai.AsyncOpenAI) -> bool:
    """A session pinned on A is served on B by its pinned upstream, not by B's own choice.

    A pins a fresh session with an embeddings request (regions only); B would send chat
    to another upstream (the GPU pool) on its own. B can answer before the pin reaches it
    and pin its own choice: then this round says False and the next tries a new session.
    """
    session = f"e2e-{uuid.uuid4().hex[:12]}"
    pinned = await _upstream_of(a, "embed", session)
    own_choice = await _upstream_of(b)
    return own_choice != pinned and await _upstream_of(b, session=session) == pinned


async def _drive(client: openai.AsyncOpenAI, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await _served(client, 4)


@pytest.mark.timeout(900)
async def test_local_multiregion_script_runs_the_whole_system(demo: Demo) -> None:
    """Both instances serve; Prometheus scrapes them; a slow pool is learnt from it and
    avoided; a session keeps its upstream across instances; SIGTERM leaves nothing behind."""
    assert set(demo.controls) == {"us-east", "eu-west", "ap-south", *POOL_SERVERS}
    sdk = {"api_key": demo.key, "max_retries": 0, "timeout": CALL_TIMEOUT_S}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
                                     ) as http, \
            openai.AsyncOpenAI(base_url=f"{demo.a}/v1", **sdk) as a, \
            openai.AsyncOpenAI(base_url=f"{demo.b}/v1", **sdk) as b:
        await eventually(lambda: _peers_connected(http, demo), timeout=START_TIMEOUT_S)
        for client in (a, b):
            assert sum((await _served(client, 12)).values()) == 12
        await eventually(lambda: _prometheus_has_scraped(http, demo, a),
                         timeout=CHANGE_TIMEOUT_S, interval=0.5)
        await eventually(lambda: _session_kept_across_instances(a, b), timeout=CHANGE_TIMEOUT_S)

        for name in POOL_SERVERS:
            async with http.post(demo.controls[name], json={"ttft_s": SLOW_S}) as resp:
                assert resp.status == 200 and (await resp.json())["ttft_s"] == SLOW_S

        async def pool_slow_on_b_from_prometheus() -> bool:
            pool = (await _json(http, f"{demo.b}/health"))["upstreams"][POOL]
            return pool["state"] == "slow" and pool["latency_source"] == "prometheus"

        stop = asyncio.Event()
        traffic = asyncio.create_task(_drive(a, stop))  # only A sends: B must learn it
        try:
            await eventually(pool_slow_on_b_from_prometheus, timeout=CHANGE_TIMEOUT_S,
                             interval=0.25)
        finally:
            stop.set()
            await traffic
        assert (await _json(http, f"{demo.b}/health"))["upstreams"][POOL]["latency_ms"] > 200
        served = await _served(b, 40)
        assert served[POOL] <= 4, served  # only latency probes, if any
        assert sum(served.values()) == 40

    demo.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(STOP_TIMEOUT_S):
        assert await demo.proc.wait() == 0
    with pytest.raises(ProcessLookupError):  # no process of its group is left: no Prometheus
        os.killpg(demo.proc.pid, 0)
