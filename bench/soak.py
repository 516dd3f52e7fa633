"""Soak: two peered skyroute instances in front of three upstreams whose faults keep changing.

Three stand-in upstreams a, b and c (first token in 20, 30 and 40 ms, then 5 tokens 5 ms
apart) run in this process. Every few seconds (``--change-every``, uniformly at random
within it) one of them, chosen at random, takes a new behaviour: answering normally, 503,
500, 429 with a Retry-After of 1-3 s, DeepSeek's keep-alive busy mode, resetting the
connection before answering (a dead server), cutting answers part-way, a first byte after
3 s, or 401 (a bad key). A change that would leave no upstream answering normally is not
made: at least one upstream is always healthy.

Two skyroute instances run as their own processes (``skyroute run``), peered over state
sync, each with skyroute's defaults except ``first_token_timeout: 2s`` on every upstream and
``resume: true`` on the route (without it a stream cut after its first content reaches the
client as an error event; see the README's stream resume section). A load of chat
completions from the openai SDK (``max_retries=0``: every answer skyroute gives is seen)
arrives at a fixed ``--rate``, alternating between the instances, every other one
streaming, each request in its own task (open loop: a slow answer does not slow the load).

Printed at the end: requests, client errors by kind (any exception the SDK raises, in-band
stream errors included), silent truncations (an answer that ended as if complete but is not
the whole answer), p50/p95/max latency, upstream calls per request (from both instances'
``skyroute_attempts_total`` and hedges), each instance's RSS at the start of the load and at
the end, and the fault changes made. ``--json`` prints the same as one JSON object, for
``tests/test_soak.py``. The exit status is 1 if there was any client error or truncation.

With ``--keep DIR`` the instances' routing files and logs (warning level), and a line per
fault change and per client error (``events.log``, seconds since the load began), stay in
DIR for a look at what happened.

Usage: python bench/soak.py [--duration 600] [--rate 10] [--change-every 2 6] [--seed N]
                            [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import openai
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _client import chat_text, quantile
from skyroute.proxy.demo import Behaviour, StandinUpstream, free_port

KEY = "sk-soak"
SYNC_TOKEN = "soak-sync-token"
NAMES = ("a", "b", "c")
TTFT_S = {"a": 0.020, "b": 0.030, "c": 0.040}
TOKENS, TOKEN_DELAY_S = 5, 0.005
MESSAGES = [{"role": "user", "content": "hi"}]
WHOLE = re.compile(r"Hello from [abc] t3 t4")
#: Behaviour fields per fault, and how often each is picked (answering normally most often).
FAULTS: dict[str, tuple[float, dict[str, object]]] = {
    "ok": (3.0, {"mode": "ok"}),
    "503": (1.0, {"mode": "error", "error_status": 503}),
    "500": (1.0, {"mode": "error", "error_status": 500}),
    "429": (1.0, {"mode": "rate_limited"}),  # Retry-After drawn per change
    "busy": (1.0, {"mode": "busy"}),
    "dead": (1.0, {"mode": "reset_before"}),
    "cuts": (1.0, {"mode": "reset_midstream"}),
    "slow first byte": (1.0, {"mode": "ok", "ttft_s": 3.0}),
    "401": (0.5, {"mode": "bad_key"}),
}
READY_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Sample:
    latency_s: float
    error: str | None = None
    truncated: bool = False
    message: str = ""  # the error's message


@dataclass(slots=True)
class Summary:
    duration_s: float
    rate: float
    requests: int = 0
    client_errors: int = 0
    silent_truncations: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)  # kind -> one message
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    max_ms: float = 0.0
    upstream_calls_per_request: float = 0.0
    rss_start_mib: list[float] = field(default_factory=list)
    rss_end_mib: list[float] = field(default_factory=list)
    fault_changes: int = 0
    faults_seen: dict[str, int] = field(default_factory=dict)


def routing_file(ups: dict[str, StandinUpstream], port: int, peer_port: int, index: int) -> str:
    """Defaults, but a 2 s first-token deadline, resume on, and the peer to sync with."""
    upstreams = "".join(
        f"  - name: {name}\n    url: {up.base_url}\n    api_key: {KEY}\n    region: r-{name}\n"
        f"    models: {{chat: deepseek-chat}}\n    first_token_timeout: 2s\n"
        for name, up in ups.items())
    return (f"listen: 127.0.0.1:{port}\ninstance:\n  id: soak-{index}\n"
            f"auth:\n  api_keys:\n    - name: soak\n      key: {KEY}\n"
            f"sync:\n  token: {SYNC_TOKEN}\n  peers: [ws://127.0.0.1:{peer_port}/sync]\n"
            f"upstreams:\n{upstreams}routes:\n  - model: chat\n    targets: [a, b, c]\n"
            "    resume: true\n")


@dataclass(slots=True)
class Instance:
    url: str
    proc: asyncio.subprocess.Process
    log: Path


async def start_instances(ups: dict[str, StandinUpstream], workdir: Path,
                          log_level: str = "error") -> list[Instance]:
    """Two ``skyroute run`` processes peered with each other; returns once both are peered."""
    ports = [free_port(), free_port()]
    instances = []
    for i, port in enumerate(ports):
        path = workdir / f"routing-{i}.yaml"
        path.write_text(routing_file(ups, port, ports[1 - i], i))
        log = workdir / f"skyroute-{i}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "skyroute.proxy.cli", "--log-level", log_level,
                "--log-format", "json", "run", "-c", str(path), "--workers", "1",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)
        instances.append(Instance(url=f"http://127.0.0.1:{port}", proc=proc, log=log))
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        for instance in instances:
            while not await _peered(http, instance):
                if instance.proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"skyroute at {instance.url} did not start and peer "
                                       f"within {READY_TIMEOUT_S:g} s; its log:\n"
                                       f"{instance.log.read_text()[-3000:]}")
                await asyncio.sleep(0.2)
    return instances


async def _peered(http: aiohttp.ClientSession, instance: Instance) -> bool:
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
        async with http.get(f"{instance.url}/health") as resp:
            peers = (await resp.json()).get("peers") or []
            # Public /health lists the peers' states only; with the admin key, by address.
            states = peers.values() if isinstance(peers, dict) else peers
            return resp.status == 200 and "connected" in set(states)
    return False


async def stop_instances(instances: list[Instance]) -> None:
    for instance in instances:
        if instance.proc.returncode is None:
            instance.proc.terminate()
    for instance in instances:
        try:
            async with asyncio.timeout(40):
                await instance.proc.wait()
        except TimeoutError:
            instance.proc.kill()
            await instance.proc.wait()


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client: openai.AsyncOpenAI, *, stream: bool, events: list[str],
              began: float) -> Sample:
    """One request; a client-visible error is recorded (and noted in ``events``), never raised."""
    sample = await _one(client, stream=stream)
    if sample.error is not None:
        events.append(f"{time.monotonic() - began:8.2f} {client.base_url} error "
                      f"{sample.error}: {sample.message}")
    return sample


async def _one(client: openai.AsyncOpenAI, *, stream: bool) -> Sample:
    started = time.perf_counter()
    try:
        text, finish = await chat_text(client, "chat", MESSAGES, stream=stream)
    except openai.APIStatusError as exc:
        return Sample(time.perf_counter() - started, error=f"{exc.status_code} {exc.code}",
                      message=exc.message)
    except openai.APIError as exc:
        code = exc.code if isinstance(exc.code, str) else type(exc).__name__
        return Sample(time.perf_counter() - started, error=code, message=exc.message)
    whole = WHOLE.fullmatch(text) is not None and finish == "stop"
    return Sample(time.perf_counter() - started, truncated=not whole)


async def change_faults(ups: dict[str, StandinUpstream], rng: random.Random,
                        every: tuple[float, float], began: float, until: float,
                        seen: Counter[str], events: list[str]) -> None:
    """Every few seconds, give one upstream a new fault; always leave one answering normally."""
    current = {name: "ok" for name in ups}
    names, weights = list(FAULTS), [weight for weight, _ in FAULTS.values()]
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(*every))
        name = rng.choice(NAMES)
        fault = rng.choices(names, weights=weights)[0]
        if all(current[n] != "ok" for n in NAMES if n != name):
            fault = "ok"  # never all down at once
        current[name] = fault
        seen[fault] += 1
        events.append(f"{time.monotonic() - began:8.2f} {name} -> {fault}  "
                      f"({', '.join(f'{n} {f}' for n, f in current.items())})")
        fields = {"mode": "ok", "ttft_s": TTFT_S[name], **FAULTS[fault][1]}
        if fault == "429":
            fields["retry_after_s"] = float(rng.randint(1, 3))
        for key, value in fields.items():
            setattr(ups[name].behaviour, key, value)


async def upstream_calls(http: aiohttp.ClientSession, instance: Instance) -> float:
    async with http.get(f"{instance.url}/metrics") as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "skyroute_attempts_total" or (
                   sample.name == "skyroute_hedges_total"
                   and sample.labels.get("result") in ("won", "lost")))


async def soak(args: argparse.Namespace) -> Summary:
    rng = random.Random(args.seed)
    ups = {name: StandinUpstream(name, api_key=KEY, behaviour=Behaviour(
        ttft_s=TTFT_S[name], tokens=TOKENS, token_delay_s=TOKEN_DELAY_S)) for name in NAMES}
    summary = Summary(duration_s=args.duration, rate=args.rate)
    seen: Counter[str] = Counter()
    for up in ups.values():
        await up.start()
    events: list[str] = []
    with tempfile.TemporaryDirectory(prefix="skyroute-soak-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        instances = await start_instances(ups, workdir,
                                          log_level="warning" if args.keep else "error")
        try:
            samples = await _load(instances, ups, rng, args, summary, seen, events)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                calls = sum([await upstream_calls(http, i) for i in instances])
            summary.rss_end_mib = [round(rss_mib(i.proc.pid), 1) for i in instances]
        finally:
            for up in ups.values():
                up.behaviour.mode = "ok"  # releases anything still held busy
            await stop_instances(instances)
            for up in ups.values():
                await up.aclose()
            if args.keep:
                (workdir / "events.log").write_text("".join(f"{e}\n" for e in sorted(events)))
    latencies = [s.latency_s * 1000 for s in samples]
    kinds = Counter(s.error for s in samples if s.error is not None)
    summary.requests = len(samples)
    summary.client_errors = sum(kinds.values())
    summary.errors_by_kind = dict(kinds.most_common())
    summary.error_examples = {kind: next(s.message for s in samples if s.error == kind)
                              for kind in kinds}
    summary.silent_truncations = sum(s.truncated for s in samples)
    summary.p50_ms = round(quantile(latencies, 0.5), 1)
    summary.p95_ms = round(quantile(latencies, 0.95), 1)
    summary.max_ms = round(max(latencies, default=0.0), 1)
    summary.upstream_calls_per_request = round(calls / max(1, len(samples)), 3)
    summary.faults_seen = dict(seen.most_common())
    summary.fault_changes = sum(seen.values())
    return summary


async def _load(instances: list[Instance], ups: dict[str, StandinUpstream],
                rng: random.Random, args: argparse.Namespace, summary: Summary,
                seen: Counter[str], events: list[str]) -> list[Sample]:
    """The fixed-rate load while the faults change; returns every request's sample."""
    clients = [openai.AsyncOpenAI(base_url=f"{i.url}/v1", api_key=KEY, max_retries=0,
                                  timeout=CLIENT_TIMEOUT_S) for i in instances]
    summary.rss_start_mib = [round(rss_mib(i.proc.pid), 1) for i in instances]
    began = time.monotonic()
    changer = asyncio.create_task(change_faults(ups, rng, tuple(args.change_every), began,
                                                began + args.duration, seen, events))
    tasks: list[asyncio.Task[Sample]] = []
    try:
        for i in range(int(args.duration * args.rate)):
            await asyncio.sleep(max(0.0, began + i / args.rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(clients[i % 2], stream=bool(i // 2 % 2),
                                                 events=events, began=began)))
        return list(await asyncio.gather(*tasks))
    finally:
        changer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await changer
        for client in clients:
            await client.close()


def report(summary: Summary) -> None:
    kinds = ", ".join(f"{k} x{n}" for k, n in summary.errors_by_kind.items()) or "none"
    faults = ", ".join(f"{k} x{n}" for k, n in summary.faults_seen.items())
    rss = ", ".join(f"{a:.0f} -> {b:.0f} MiB ({(b - a) / a:+.0%})"
                    for a, b in zip(summary.rss_start_mib, summary.rss_end_mib, strict=True))
    print(f"soak: {summary.duration_s:g} s at {summary.rate:g} requests/s over two peered "
          "skyroute instances, half streaming, three upstreams changing faults")
    print("| requests | client errors | silent truncations | p50 ms | p95 ms | max ms "
          "| upstream calls/req | RSS per instance (start -> end) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {summary.requests} | {summary.client_errors} | {summary.silent_truncations} "
          f"| {summary.p50_ms:.0f} | {summary.p95_ms:.0f} | {summary.max_ms:.0f} "
          f"| {summary.upstream_calls_per_request:.2f} | {rss} |")
    print(f"errors by kind: {kinds}")
    for kind, message in summary.error_examples.items():
        print(f"  {kind}: {message[:300]}")
    print(f"fault changes: {summary.fault_changes} ({faults})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--change-every", type=float, nargs=2, default=[2.0, 6.0],
                        metavar=("MIN", "MAX"), help="seconds between fault changes")
    parser.add_argument("--seed", type=int, default=None, help="for the fault sequence")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", metavar="DIR",
                        help="keep routing files, instance logs and events.log in DIR")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    summary = asyncio.run(soak(args))
    if args.json:
        print(json.dumps({"seed": args.seed, **asdict(summary)}))
    else:
        report(summary)
        print(f"(seed {args.seed})")
    return 1 if summary.client_errors or summary.silent_truncations else 0


if __name__ == "__main__":
    sys.exit(main())
