"""Chaos: upstreams killed and restarted under a steady mixed load; no client sees an error.

Three stand-ins serve one route with ``resume: true``. 500 chat completions through the real
``openai`` SDK (16 at a time, every other one streaming) run while a chaos task kills one
upstream (``StandinUpstream.aclose()``: the listening socket goes and every open answer is
cut mid-way) and restarts it on the same port, one upstream at a time, so at least one is
always up. The chaos is driven by progress (kill after N more answers, restart after M more),
never by sleeps, so a slow machine only makes the test slower, not flaky.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from dataclasses import dataclass, field

import aiohttp
import openai
from prometheus_client.parser import text_string_to_metric_families
from skyroute.proxy import Server
from skyroute.proxy.demo import Behaviour, StandinUpstream

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

MESSAGES = [{"role": "user", "content": "hi"}]
NAMES = ("a", "b", "c")
REQUESTS = 500
CONCURRENCY = 16
#: Words per answer: "Hello from <upstream> t3 ... t9". Long enough, with the token delay,
#: that a kill finds streams part-way through.
TOKENS = 10
#: Answers completed before the first kill, while an upstream is down, and between a
#: restart and the next kill.
WARM, DOWN, UP = 60, 40, 40
ROUTE = f"""\
- model: chat
  targets: [{", ".join(NAMES)}]
  strategy: weighted
  latency_threshold: 60s  # spread evenly even on a loaded machine, so every kill cuts some
  resume: true
"""
# What a user who restarts upstreams often would set (README, "Under chaos"):
# * breaker cool-down: how soon a restarted upstream is back in rotation. The default (5 s,
#   doubling on each repeated trip) outlasts this whole run; a restarted process is back
#   within a fraction of a second.
# The default retry budget is enough: a kill fails every answer open on that upstream at
# once, and each one moves on to another upstream (cut streams resume, JSON retries), which
# is failover to an untried healthy upstream and costs no budget. (When every move was paid,
# one such burst spent the default 20 % early in a run and this needed 50 %.)
RESILIENCE = """\
breaker:
  cooldown: 250ms
  max_cooldown: 2s
"""


@dataclass
class _Progress:
    """Answers completed so far, which the chaos task waits on instead of sleeping."""

    done: int = 0
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def count(self, error: str | None = None) -> None:
        async with self.changed:
            self.done += 1
            if error is not None:
                self.errors.append(error)
            self.changed.notify_all()

    async def reach(self, n: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.done >= n)


def _is_whole(text: str | None) -> bool:
    """A complete answer: "Hello from <an upstream> t3 ... t9", each word once.

    A resumed stream may name the upstream that finished it rather than the one that began.
    """
    words = (text or "").split()
    return (len(words) == TOKENS and words[:2] == ["Hello", "from"] and words[2] in NAMES
            and words[3:] == [f"t{i}" for i in range(3, TOKENS)])


async def _one(client: openai.AsyncOpenAI, i: int) -> str | None:
    """Request ``i`` (odd ones stream); what went wrong, or None."""
    try:
        if i % 2:
            stream = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                          stream=True)
            chunks = [c async for c in stream if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            if len({c.id for c in chunks}) != 1:
                return f"stream {i}: several ids {sorted({c.id for c in chunks})}"
            finish = chunks[-1].choices[0].finish_reason if chunks else None
        else:
            reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    except openai.APIError as exc:
        return f"request {i} ({'stream' if i % 2 else 'json'}): {type(exc).__name__}: {exc}"
    if finish != "stop":
        return f"request {i}: finish_reason {finish!r}"
    return None if _is_whole(text) else f"request {i}: incomplete answer {text!r}"


async def _load(client: openai.AsyncOpenAI, progress: _Progress) -> None:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            await progress.count(await _one(client, i))

    await asyncio.gather(*(one(i) for i in range(REQUESTS)))


@dataclass
class _Chaos:
    kills: list[str] = field(default_factory=list)
    cut_in_flight: int = 0  # answers open on an upstream at the moment it was killed
    restarts: int = 0


async def _chaos(server: Server, ups: list[StandinUpstream], progress: _Progress, chaos: _Chaos
                 ) -> None:
    """Kill and restart one upstream at a time, round-robin, driven by answers completed.

    The next kill waits until skyroute has the restarted upstream back in rotation, as a
    rolling restart waits for readiness: "one at a time" as skyroute sees it too.
    """
    mark = WARM
    for up in itertools.cycle(ups):
        if mark + DOWN >= REQUESTS - UP:  # leave the end of the run calm, all three up
            return
        await progress.reach(mark)
        port = up.port
        chaos.cut_in_flight += up.in_flight
        await up.aclose()
        chaos.kills.append(up.name)
        await progress.reach(mark + DOWN)
        await up.start(port=port)  # the same address skyroute has in its routing file
        chaos.restarts += 1
        await eventually(functools.partial(_is_in_rotation, server, up.name),
                         timeout=CALL_TIMEOUT_S)
        mark += DOWN + UP


async def _is_in_rotation(server: Server, name: str) -> bool:
    """skyroute sends ``name`` requests again: its cool-down is over ("slow" under load)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        health = await (await h.get(f"{server.url}/health")).json()
    return health["upstreams"][name]["state"] in ("healthy", "slow")


async def _metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        text = await (await h.get(f"{server.url}/metrics")).text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_kills_and_restarts_under_mixed_load_give_no_client_errors(standin, skyroute):
    """500 requests, half streaming, while upstreams die and come back: every answer whole."""
    ups = [await standin(name, behaviour=Behaviour(tokens=TOKENS, ttft_s=0.005,
                                                   token_delay_s=0.004)) for name in NAMES]
    text = routing_yaml([entry(u, extra="first_token_timeout: 2s\n",
                               models="{chat: deepseek-chat}") for u in ups], ROUTE,
                        extra=RESILIENCE)
    server = await skyroute(text)
    progress, chaos = _Progress(), _Chaos()
    async with client_for(server) as client:
        chaos_task = asyncio.create_task(_chaos(server, ups, progress, chaos))
        try:
            await _load(client, progress)
        finally:
            chaos_task.cancel()  # done by now unless the load finished first
            with contextlib.suppress(asyncio.CancelledError):
                await chaos_task  # a failure in the chaos itself fails the test
    assert progress.errors == [], f"{len(progress.errors)} client errors: {progress.errors[:5]}"
    assert progress.done == REQUESTS
    assert chaos.kills[:3] == list(NAMES) and chaos.restarts == len(chaos.kills)
    assert chaos.cut_in_flight > 0, "no kill found an answer in flight: nothing was tested"
    metrics = await _metrics(server)
    resumes = {dict(k[1])["result"]: v for k, v in metrics.items()
               if k[0] == "skyroute_stream_resumes_total"}
    assert resumes.get("resumed", 0) > 0 and resumes.get("cut", 0) == 0, resumes
    assert metrics[("skyroute_failovers_total", (("route", "chat"),))] > 0
    # Every restarted upstream is back in rotation and answering again.
    before = [up.requests_total for up in ups]
    async with client_for(server) as client:
        await eventually(lambda: _all_answer(client, ups, before), timeout=CALL_TIMEOUT_S)


async def _all_answer(client: openai.AsyncOpenAI, ups: list[StandinUpstream],
                      before: list[int]) -> bool:
    await asyncio.gather(*(client.chat.completions.create(model="chat", messages=MESSAGES)
                           for _ in range(6)))
    return all(up.requests_total > n for up, n in zip(ups, before, strict=True))
