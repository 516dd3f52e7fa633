"""Benchmark: what a client sees under each upstream fault, through skyroute and directly.

Three stand-in upstreams a, b and c (first token in 20, 30 and 40 ms, then 5 tokens 5 ms
apart) take one fault scenario each run. A client made with the openai SDK sends 60 chat
completions, every other one streaming, from 6 concurrent workers; the SDK's own retries are
off (``max_retries=0``) so every answer skyroute gives is seen, and its timeout is
``--client-timeout``. Each scenario runs twice on fresh stand-ins:

* **skyroute**: a fresh skyroute with its default settings except ``first_token_timeout: 2s``
  on each upstream, and one route ``chat`` over ``[a, b, c]``;
* **direct**: the client talks to ``a`` itself (what an app with one provider sees).

Printed per run: client-visible errors (any exception the SDK raises, an in-band stream error
included), silent truncations (an answer that ended as if complete but is not the whole
answer), p50/p95 latency of every request (a failed one for as long as the client waited),
upstream calls per request (skyroute's ``skyroute_attempts_total``, plus the hedge losers it
cancelled; direct: one per request), and the ``Retry-After`` values the errors carried
(``none`` when an error had none; ``!`` when a message's "retry after Ns" disagrees with its
header). Below the table, each run's errors by kind.

Usage: python bench/faults.py [--requests 60] [--concurrency 6] [--client-timeout 30]
                              [--only SCENARIO ...]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai
import uvloop
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _client import chat_text, quantile
from skyroute.proxy import Server
from skyroute.proxy._logging import configure_logging
from skyroute.proxy.demo import Behaviour, StandinUpstream
from skyroute.routing import parse_config

KEY = "sk-bench"
NAMES = ("a", "b", "c")
TTFT_S = {"a": 0.020, "b": 0.030, "c": 0.040}
TOKENS, TOKEN_DELAY_S = 5, 0.005
FIRST_TOKEN_TIMEOUT = "2s"
MESSAGES = [{"role": "user", "content": "hi"}]
#: The whole answer a stand-in gives with ``TOKENS`` tokens: anything else is truncated.
WHOLE = re.compile(r"Hello from [abc] t3 t4")
_RETRY_IN_MESSAGE = re.compile(r"[Rr]etry after (\d+)\s*s")

Setup = Callable[[dict[str, StandinUpstream]], Awaitable[None]]


async def _noop(ups: dict[str, StandinUpstream]) -> None:
    return None


def _modes(**changes: dict[str, object]) -> Setup:
    async def setup(ups: dict[str, StandinUpstream]) -> None:
        for name, fields in changes.items():
            for key, value in fields.items():
                setattr(ups[name].behaviour, key, value)
    return setup


def _dead_and(*dead: str, **changes: dict[str, object]) -> Setup:
    """Stop the ``dead`` stand-ins (their ports refuse connections), change the others."""
    modes = _modes(**changes)

    async def setup(ups: dict[str, StandinUpstream]) -> None:
        for name in dead:
            await ups[name].aclose()
        await modes(ups)
    return setup


SCENARIOS: dict[str, Setup] = {
    "a 503, b busy, c ok": _modes(a={"mode": "error", "error_status": 503},
                                  b={"mode": "busy"}),
    "a 429 + Retry-After": _modes(a={"mode": "rate_limited", "retry_after_s": 5.0}),
    "a cuts streams": _modes(a={"mode": "reset_midstream"}),
    "all three 503": _modes(**{n: {"mode": "error", "error_status": 503} for n in NAMES}),
    "a, c dead, b busy": _dead_and("a", "c", b={"mode": "busy"}),
    "a slow first byte 3s": _modes(a={"ttft_s": 3.0}),
    "a bad key (401)": _modes(a={"mode": "bad_key"}),
    # Not a default: a stream cut after content reached the client goes on elsewhere.
    "a cuts streams, resume: true": _modes(a={"mode": "reset_midstream"}),
}
#: Route keys a scenario adds to skyroute's routing file.
ROUTE_EXTRA = {"a cuts streams, resume: true": "    resume: true\n"}


@dataclass(slots=True)
class Sample:
    latency_s: float
    error: str | None = None  # a short kind, e.g. "503 upstream_unavailable"
    truncated: bool = False
    retry_after: str | None = None  # the header on an error, "none" if it had none
    retry_mismatch: bool = False
    message: str = ""  # the error's message, for the breakdown under the table


@dataclass(slots=True)
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    calls: float = 0.0


def _error_sample(exc: Exception, started: float) -> Sample:
    latency = time.perf_counter() - started
    if isinstance(exc, openai.APIStatusError):
        header = exc.response.headers.get("Retry-After")
        said = _RETRY_IN_MESSAGE.search(exc.message or "")
        mismatch = said is not None and header is not None and said[1] != header
        return Sample(latency, error=f"{exc.status_code} {exc.code or ''}".strip(),
                      retry_after=header or "none", retry_mismatch=mismatch,
                      message=exc.message or "")
    if isinstance(exc, openai.APIError):  # an in-band stream error event, or a broken stream
        code = exc.code if isinstance(exc.code, str) else type(exc).__name__
        return Sample(latency, error=code, message=exc.message or "")
    return Sample(latency, error=type(exc).__name__, message=str(exc))


async def one(client: openai.AsyncOpenAI, model: str, *, stream: bool) -> Sample:
    """One request; a client-visible error is recorded, never raised."""
    started = time.perf_counter()
    try:
        text, finish = await chat_text(client, model, MESSAGES, stream=stream)
    except Exception as exc:  # every failure is a data point here
        return _error_sample(exc, started)
    whole = WHOLE.fullmatch(text) is not None and finish == "stop"
    return Sample(time.perf_counter() - started, truncated=not whole)


async def run_load(base_url: str, model: str, args: argparse.Namespace) -> list[Sample]:
    """``args.requests`` requests from ``args.concurrency`` workers, every other streaming."""
    samples: list[Sample] = []
    counter = iter(range(args.requests))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0,
                                  timeout=args.client_timeout) as client:
        async def worker() -> None:
            for i in counter:
                samples.append(await one(client, model, stream=bool(i % 2)))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return samples


def routing_file(ups: dict[str, StandinUpstream], route_extra: str = "") -> str:
    """skyroute's defaults, but for a 2 s first-token deadline and one route over a, b, c."""
    upstreams = "".join(
        f"  - name: {name}\n    url: http://127.0.0.1:{up.port}/v1\n    api_key: {KEY}\n"
        f"    region: r-{name}\n    models: {{chat: deepseek-chat}}\n"
        f"    first_token_timeout: {FIRST_TOKEN_TIMEOUT}\n"
        for name, up in ups.items())
    return (f"listen: 127.0.0.1:0\nauth:\n  api_keys:\n    - name: bench\n      key: {KEY}\n"
            f"upstreams:\n{upstreams}routes:\n  - model: chat\n    targets: [a, b, c]\n"
            f"{route_extra}")


async def upstream_calls(server: Server) -> float:
    """Upstream calls skyroute made: attempts with an outcome plus hedge losers it cancelled."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    calls = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "skyroute_attempts_total" or (
                    sample.name == "skyroute_hedges_total"
                    and sample.labels.get("result") in ("won", "lost")):
                calls += sample.value
    return calls


async def run_scenario(setup: Setup, *, via_skyroute: bool, args: argparse.Namespace,
                       route_extra: str = "") -> RunResult:
    ups = {name: StandinUpstream(name, api_key=KEY, behaviour=Behaviour(
        ttft_s=TTFT_S[name], tokens=TOKENS, token_delay_s=TOKEN_DELAY_S)) for name in NAMES}
    for up in ups.values():
        await up.start()
    server: Server | None = None
    try:
        await setup(ups)
        if not via_skyroute:
            samples = await run_load(f"http://127.0.0.1:{ups['a'].port}/v1", "deepseek-chat",
                                     args)
            return RunResult(samples=samples, calls=float(len(samples)))
        server = Server(parse_config(routing_file(ups, route_extra), env={}), port=0, grace_s=1.0)
        await server.start()
        samples = await run_load(f"{server.url}/v1", "chat", args)
        return RunResult(samples=samples, calls=await upstream_calls(server))
    finally:
        for up in ups.values():
            up.behaviour.mode = "ok"  # releases anything still held busy
        if server is not None:
            await server.aclose()
        for up in ups.values():
            await up.aclose()


def retry_after_summary(samples: list[Sample]) -> str:
    values = [s.retry_after for s in samples if s.retry_after is not None]
    if not values:
        return "-"
    numbers = sorted({int(v) for v in values if v.isdigit()})
    parts = []
    if numbers:
        parts.append(f"{numbers[0]}s" if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}s")
    if "none" in values:
        parts.append(f"none x{values.count('none')}")
    if any(s.retry_mismatch for s in samples):
        parts.append("!")
    return " ".join(parts)


def row(scenario: str, target: str, result: RunResult) -> str:
    samples = result.samples
    latencies = [s.latency_s * 1000 for s in samples]
    errors = sum(s.error is not None for s in samples)
    truncated = sum(s.truncated for s in samples)
    return (f"| {scenario} | {target} | {errors} | {truncated} | {quantile(latencies, 0.5):.0f} "
            f"| {quantile(latencies, 0.95):.0f} | {result.calls / max(1, len(samples)):.2f} "
            f"| {retry_after_summary(samples)} |")


async def main(args: argparse.Namespace) -> int:
    print(f"stand-ins a, b, c: first token {', '.join(f'{s * 1000:.0f}' for s in TTFT_S.values())}"
          f" ms, {TOKENS} tokens {TOKEN_DELAY_S * 1000:.0f} ms apart; {args.requests} requests "
          f"(half streaming) from {args.concurrency} openai SDK clients (max_retries=0, timeout "
          f"{args.client_timeout:g} s); skyroute defaults but first_token_timeout "
          f"{FIRST_TOKEN_TIMEOUT}; direct = to a")
    print("| scenario | via | errors | silent truncations | p50 ms | p95 ms | upstream calls/req "
          "| Retry-After |")
    print("|---|---|---|---|---|---|---|---|")
    details: list[str] = []
    skyroute_failed = False
    for scenario, setup in SCENARIOS.items():
        if args.only and scenario not in args.only:
            continue
        for via_skyroute in (True, False):
            target = "skyroute" if via_skyroute else "direct"
            if not via_skyroute and scenario in ROUTE_EXTRA:
                continue  # the same as without the route key
            result = await run_scenario(setup, via_skyroute=via_skyroute, args=args,
                                        route_extra=ROUTE_EXTRA.get(scenario, ""))
            print(row(scenario, target, result), flush=True)
            kinds = Counter(s.error for s in result.samples if s.error is not None)
            for kind, n in kinds.most_common():
                example = next(s.message for s in result.samples if s.error == kind)
                details.append(f"{scenario}, {target}: {kind} x{n}: {example[:150]}")
            if via_skyroute and any(s.truncated or s.retry_mismatch for s in result.samples):
                skyroute_failed = True
    if details:
        print("\nerrors by kind:")
        for line in details:
            print(f"  {line}")
    return 1 if skyroute_failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--client-timeout", type=float, default=30.0,
                        help="the SDK's timeout per request, seconds")
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only these scenarios: {', '.join(SCENARIOS)}")
    arguments = parser.parse_args()
    # skyroute logs every failover; only its errors belong beside the table.
    configure_logging(level="error", json=False)
    sys.exit(uvloop.run(main(arguments)))
