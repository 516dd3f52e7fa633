"""Benchmark: what skyroute adds on top of a 0 ms upstream, next to a bare pass-through.

Starts three processes on 127.0.0.1 (each on a free port):
* the stand-in upstream (``bench/_upstream.py``, ttft 0, token delay 0), pinned to core 0,
* a bare 40-line aiohttp+uvloop pass-through proxy (``bench/_passthrough.py``), core 1,
* skyroute (``skyroute run --workers 1``, one upstream, one API key), core 1,
and drives them from this process (pinned to core 0): an aiohttp+uvloop load generator with
keep-alive connections at concurrency 1 and 64, non-streaming and streaming chat completions,
against the upstream directly, through the bare pass-through and through skyroute.

Then, in the same run, the scaling part (``--no-scaling`` skips it): nothing pinned (load
generator, upstream and proxies share every core), skyroute ``--workers 1`` and
``--workers 2`` at the highest concurrency, each measured the same way; printed: throughput
of two workers over one, and CPU per request (supervisor and workers together) of two over one.

Each phase (mode x concurrency x target) is warmed up, then bounded by ``--requests`` and
``--seconds``. Printed: requests/s, p50/p99 latency (to the last byte), the p50/p99 added by
each proxy vs direct, skyroute's throughput as a share of the bare pass-through's, and the
proxy process's CPU seconds per 1000 requests (utime+stime from /proc/PID/stat), because at 64
connections the load generator and the upstream may saturate core 0 and hide proxy cost.

Targets (see issue 2): added p50 <= 0.5 ms at concurrency 1; throughput at 64 connections
>= 70 % of the bare pass-through's (non-streaming), >= 80 % (streaming).

Usage: python bench/overhead.py [--requests 6000] [--seconds 6] [--warmup 1]
                                [--concurrency 1 64] [--json FILE] [--short] [--no-scaling]

``--short`` (for CI: about a minute) measures far fewer requests per phase; its ratios are
rougher but the same ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT_KEY = "sk-bench-client"
UPSTREAM_KEY = "sk-bench-upstream"
LOAD_CORE, PROXY_CORE = 0, 1
TARGETS = ("direct", "bare", "skyroute")
#: The scaling part: skyroute with one and with two workers, nothing pinned.
SCALING_TARGETS = ("sky-w1", "sky-w2")
#: Goals from issue 14 for the scaling part: two workers' throughput over one worker's.
WORKERS_THROUGHPUT_GOAL = 1.4
MODES = ("json", "stream")
START_TIMEOUT_S = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Targets from the issue: added p50 at concurrency 1; throughput share of the bare pass-through.
P50_TARGET_MS = 0.5
THROUGHPUT_TARGETS = {"json": 0.70, "stream": 0.80}


@dataclass
class Phase:
    mode: str
    concurrency: int
    target: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    proxy_cpu_s: float | None  # CPU seconds the proxy process used during the phase
    proxy_cpu_s_per_1k: float | None
    loadgen_cpu_s: float  # this process (load generator), for context


# ----------------------------------------------------------------------------- processes


class Procs:
    """The child processes; ``stop()`` ends every one of them (also on errors / Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopped: set[str] = set()
        self.tmp = Path(tempfile.mkdtemp(prefix="skyroute-bench-"))

    def spawn(self, name: str, argv: list[str], *, core: int | None, **kw: Any
              ) -> subprocess.Popen[bytes]:
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(core), *argv]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def stop_one(self, name: str) -> None:
        """Stop the process ``name`` (SIGTERM; its drain is short: --grace 1)."""
        for each, proc in self.procs:
            if each == name and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.stopped.add(name)

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_url_line(proc: subprocess.Popen[bytes], name: str) -> str:
    """The ``{"url": ...}`` line a helper prints on stdout once it listens."""
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the helpers print exactly one line, at once
    if not line:
        raise RuntimeError(f"{name} exited before listening (exit status {proc.wait()})")
    return str(json.loads(line)["url"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_listening(proc: subprocess.Popen[bytes], log: Path, port: int | None,
                       event_name: str = "server_started") -> str:
    """skyroute logs ``{"url": ..., "event": "server_started"}`` on stderr (a file here;
    ``workers_started`` from a supervisor); with ``port`` (log level above info: no such
    line), wait until it accepts connections."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"skyroute exited with status {proc.returncode}:\n"
                               + log.read_text()[-3000:])
        if port is not None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return f"http://127.0.0.1:{port}"
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == event_name:
                    return str(event["url"])
        time.sleep(0.05)
    raise RuntimeError("skyroute did not log 'server_started' in time:\n"
                       + log.read_text()[-3000:])


def routing_yaml(upstream_url: str) -> str:
    return (f"listen: 127.0.0.1:0\n"
            f"auth:\n  api_keys:\n    - name: bench\n      key: {CLIENT_KEY}\n"
            f"upstreams:\n  - name: bench\n    url: {upstream_url}\n"
            f"    api_key: {UPSTREAM_KEY}\n    region: local\n"
            f"    models: {{chat: deepseek-chat}}\n")


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """utime + stime of processes (all their threads), from /proc/PID/stat."""
    total = 0.0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)
    return total


def memory_mib(pids: tuple[int, ...], field: str) -> list[float]:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of each process, in MiB, from /proc/PID/status."""
    out = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                out.append(int(line.split()[1]) / 1024)
    return out


def memory_line(targets: list[Target], idle: dict[str, list[float]]) -> str:
    """Idle and peak RSS of each proxy process (issue 14's goal: at most 80 MB per worker)."""
    parts = [f"{t.name} idle {'/'.join(f'{m:.1f}' for m in idle[t.name])} MiB, peak "
             f"{'/'.join(f'{m:.1f}' for m in memory_mib(t.pids, 'VmHWM'))} MiB"
             for t in targets if t.pids]
    return "RSS per process (goal: <= 80 MB = 76.3 MiB per worker): " + "; ".join(parts)


def worker_pids(log: Path) -> tuple[int, ...]:
    """The worker pids a ``--workers N`` supervisor logged (``workers_started``)."""
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "workers_started":
                return tuple(event["pids"])
    return ()


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # ends in /v1/chat/completions
    key: str
    model: str
    pids: tuple[int, ...]  # the proxy processes whose CPU is measured


def body_for(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream, "max_tokens": 16, "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello in five words."}]}).encode()


async def run_phase(session: aiohttp.ClientSession, target: Target, *, stream: bool,
                    concurrency: int, max_requests: int, max_seconds: float,
                    ) -> tuple[list[float], int, float]:
    """Run ``concurrency`` workers until ``max_requests`` are done or ``max_seconds`` pass.

    Returns (latencies in seconds, errors, elapsed seconds).
    """
    body = body_for(target.model, stream)
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    issued = 0
    perf = time.perf_counter
    deadline = perf() + max_seconds

    async def worker() -> None:
        nonlocal errors, issued
        while issued < max_requests and perf() < deadline:
            issued += 1
            t0 = perf()
            try:
                async with session.post(target.url, data=body, headers=headers) as resp:
                    if stream:
                        tail = b""
                        async for chunk in resp.content.iter_any():
                            tail = chunk
                        ok = resp.status == 200 and tail.endswith(b"data: [DONE]\n\n")
                    else:
                        ok = resp.status == 200 and b'"choices"' in await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                latencies.append(perf() - t0)
            else:
                errors += 1
                if errors == 1:
                    print(f"  ! first error on {target.name} ({'stream' if stream else 'json'})",
                          file=sys.stderr)

    t_start = perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, perf() - t_start


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


async def measure(targets: list[Target], args: argparse.Namespace) -> list[Phase]:
    """Every (mode, concurrency): ``--rounds`` rounds, each giving every target a slice of
    ``--requests``/``--seconds`` in turn, so that noise from elsewhere on the machine is
    spread over all targets alike; one warm-up per target first."""
    phases: list[Phase] = []
    timeout = aiohttp.ClientTimeout(total=30)
    rounds = max(1, args.rounds)
    for mode in args.modes:
        stream = mode == "stream"
        for conc in args.concurrency:
            sessions = {t.name: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=conc), timeout=timeout) for t in targets}
            acc: dict[str, dict[str, Any]] = {
                t.name: {"lat": [], "errors": 0, "elapsed": 0.0, "cpu": 0.0, "own": 0.0}
                for t in targets}
            try:
                for t in targets:
                    await run_phase(sessions[t.name], t, stream=stream, concurrency=conc,
                                    max_requests=args.warmup_requests, max_seconds=args.warmup)
                for _ in range(rounds):
                    for t in targets:
                        a = acc[t.name]
                        cpu0 = cpu_seconds(t.pids)
                        own0 = time.process_time()
                        lat, errors, elapsed = await run_phase(
                            sessions[t.name], t, stream=stream, concurrency=conc,
                            max_requests=max(1, args.requests // rounds),
                            max_seconds=args.seconds / rounds)
                        a["own"] += time.process_time() - own0
                        a["cpu"] += cpu_seconds(t.pids) - cpu0
                        a["lat"] += lat
                        a["errors"] += errors
                        a["elapsed"] += elapsed
            finally:
                for s in sessions.values():
                    await s.close()
            for t in targets:
                a = acc[t.name]
                lat, n, elapsed = sorted(a["lat"]), len(a["lat"]), a["elapsed"]
                cpu = a["cpu"] if t.pids else None
                phase = Phase(
                    mode=mode, concurrency=conc, target=t.name, requests=n,
                    errors=a["errors"], seconds=round(elapsed, 3),
                    rps=n / elapsed if elapsed else 0.0,
                    p50_ms=percentile(lat, 0.50) * 1e3, p99_ms=percentile(lat, 0.99) * 1e3,
                    mean_ms=statistics.fmean(lat) * 1e3 if lat else float("nan"),
                    proxy_cpu_s=cpu,
                    proxy_cpu_s_per_1k=cpu / n * 1000 if cpu is not None and n else None,
                    loadgen_cpu_s=a["own"])
                phases.append(phase)
                cpu_txt = (f"  proxy CPU {phase.proxy_cpu_s_per_1k:6.3f} s/1k"
                           if phase.proxy_cpu_s_per_1k is not None else "")
                print(f"  {mode:6} c={conc:<3} {t.name:8} {n:6d} req {phase.rps:8.0f}/s "
                      f"p50 {phase.p50_ms:7.3f} ms p99 {phase.p99_ms:7.3f} ms{cpu_txt}"
                      f"{f'  ERRORS {phase.errors}' if phase.errors else ''}", file=sys.stderr)
    return phases


# ----------------------------------------------------------------------------- report


def report(phases: list[Phase], args: argparse.Namespace) -> dict[str, Any]:
    by = {(p.mode, p.concurrency, p.target): p for p in phases}
    out: list[str] = []
    w = out.append

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    w("")
    w("skyroute overhead benchmark (upstream: stand-in, ttft 0, token delay 0, "
      f"{args.tokens} tokens; latency = request to last byte)")
    w(f"cores: load generator + upstream on {LOAD_CORE}, proxies on {PROXY_CORE}; "
      f"per phase: <= {args.requests} requests / {args.seconds} s in {args.rounds} "
      f"interleaved rounds, after {args.warmup} s warm-up")
    w("")
    w(f"{'mode':6} {'conc':>4} {'target':9} {'requests':>8} {'errors':>6} {'req/s':>8} "
      f"{'p50 ms':>8} {'p99 ms':>8} {'proxy CPU s/1k req':>19}")
    w("-" * 84)
    for p in phases:
        w(f"{p.mode:6} {p.concurrency:>4} {p.target:9} {p.requests:>8} {p.errors:>6} "
          f"{p.rps:>8.0f} {p.p50_ms:>8.3f} {p.p99_ms:>8.3f} "
          f"{fmt(p.proxy_cpu_s_per_1k, '.3f'):>19}")

    w("")
    w("Added latency vs direct, throughput and CPU of skyroute vs the bare pass-through")
    w(f"{'mode':6} {'conc':>4} {'bare +p50':>10} {'bare +p99':>10} {'sky +p50':>10} "
      f"{'sky +p99':>10} {'rps sky/direct':>15} {'rps sky/bare':>13} "
      f"{'CPU/req sky/bare':>17}")
    w("-" * 102)
    summary: list[dict[str, Any]] = []
    verdicts: list[str] = []
    for mode in args.modes:
        for conc in args.concurrency:
            d, b, s = (by.get((mode, conc, t)) for t in TARGETS)
            if not (d and b and s):
                continue
            row = {
                "mode": mode, "concurrency": conc,
                "bare_added_p50_ms": b.p50_ms - d.p50_ms, "bare_added_p99_ms": b.p99_ms - d.p99_ms,
                "skyroute_added_p50_ms": s.p50_ms - d.p50_ms,
                "skyroute_added_p99_ms": s.p99_ms - d.p99_ms,
                "throughput_ratio_skyroute_vs_direct": s.rps / d.rps if d.rps else None,
                "throughput_ratio_skyroute_vs_bare": s.rps / b.rps if b.rps else None,
                "cpu_per_request_ratio_skyroute_vs_bare":
                    (s.proxy_cpu_s_per_1k / b.proxy_cpu_s_per_1k
                     if s.proxy_cpu_s_per_1k and b.proxy_cpu_s_per_1k else None),
            }
            summary.append(row)
            w(f"{mode:6} {conc:>4} {row['bare_added_p50_ms']:>+10.3f} "
              f"{row['bare_added_p99_ms']:>+10.3f} {row['skyroute_added_p50_ms']:>+10.3f} "
              f"{row['skyroute_added_p99_ms']:>+10.3f} "
              f"{fmt(row['throughput_ratio_skyroute_vs_direct'], '.1%'):>15} "
              f"{fmt(row['throughput_ratio_skyroute_vs_bare'], '.1%'):>13} "
              f"{fmt(row['cpu_per_request_ratio_skyroute_vs_bare'], '.2f'):>17}")
            if conc == 1:
                ok = row["skyroute_added_p50_ms"] <= P50_TARGET_MS
                verdicts.append(f"{'PASS' if ok else 'FAIL'}  {mode:6} c=1   skyroute added p50 "
                                f"{row['skyroute_added_p50_ms']:.3f} ms (target <= "
                                f"{P50_TARGET_MS} ms; bare {row['bare_added_p50_ms']:.3f} ms)")
            if conc == max(args.concurrency) and conc > 1:
                ratio = row["throughput_ratio_skyroute_vs_bare"] or 0.0
                cpu_ratio = row["cpu_per_request_ratio_skyroute_vs_bare"]
                goal = THROUGHPUT_TARGETS[mode]
                ok = ratio >= goal
                # If core 0 (load generator + upstream) is the bottleneck, both proxies serve
                # about the same rate; the CPU cost per request then shows what each would
                # serve on its own core: 1/cpu_ratio.
                cpu_note = (f"; CPU/req {cpu_ratio:.2f}x bare -> ~{1 / cpu_ratio:.0%} of "
                            "its throughput when CPU-bound" if cpu_ratio else "")
                verdicts.append(f"{'PASS' if ok else 'FAIL'}  {mode:6} c={conc:<3} "
                                f"throughput {ratio:.1%} of bare (target >= {goal:.0%})"
                                f"{cpu_note}")
    w("")
    w("(+p50/+p99: ms added vs the upstream hit directly at the same mode and concurrency;"
      " rps sky/direct, sky/bare: skyroute's requests/s over the upstream's hit directly and"
      " over the bare pass-through's; CPU/req sky/bare:"
      " proxy CPU seconds per request, skyroute over bare)")
    w("")
    w("Targets")
    out.extend(verdicts)
    print("\n".join(out), flush=True)
    return {"phases": [asdict(p) for p in phases], "summary": summary, "verdicts": verdicts}


def report_scaling(phases: list[Phase], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Two workers over one, measured the same way (nothing pinned)."""
    by = {(p.mode, p.target): p for p in phases}
    out = ["", "Scaling: skyroute --workers 2 over --workers 1 (nothing pinned; load generator "
           "and upstream share the cores)",
           f"{'mode':6} {'conc':>4} {'w1 req/s':>9} {'w2 req/s':>9} {'rps w2/w1':>10} "
           f"{'CPU/req w1':>11} {'CPU/req w2':>11} {'CPU/req w2/w1':>14}", "-" * 82]
    rows = []
    for mode in args.modes:
        one, two = by.get((mode, "sky-w1")), by.get((mode, "sky-w2"))
        if not (one and two and one.rps and one.proxy_cpu_s_per_1k and two.proxy_cpu_s_per_1k):
            continue
        row = {"mode": mode, "concurrency": one.concurrency, "rps_w1": one.rps,
               "rps_w2": two.rps, "throughput_ratio_w2_vs_w1": two.rps / one.rps,
               "cpu_per_request_ratio_w2_vs_w1":
                   two.proxy_cpu_s_per_1k / one.proxy_cpu_s_per_1k}
        rows.append(row)
        out.append(f"{mode:6} {one.concurrency:>4} {one.rps:>9.0f} {two.rps:>9.0f} "
                   f"{row['throughput_ratio_w2_vs_w1']:>10.2f} "
                   f"{one.proxy_cpu_s_per_1k:>11.3f} {two.proxy_cpu_s_per_1k:>11.3f} "
                   f"{row['cpu_per_request_ratio_w2_vs_w1']:>14.2f}")
        ok = row["throughput_ratio_w2_vs_w1"] >= WORKERS_THROUGHPUT_GOAL
        out.append(f"{'PASS' if ok else 'FAIL'}  {mode:6} two workers serve "
                   f"{row['throughput_ratio_w2_vs_w1']:.2f}x one worker "
                   f"(goal >= {WORKERS_THROUGHPUT_GOAL}x)")
    out.append("(CPU/req: CPU seconds per 1000 requests of the supervisor and its workers)")
    print("\n".join(out), flush=True)
    return rows


def start_skyroute(procs: Procs, args: argparse.Namespace, config: Path, name: str, *,
                   workers: int, core: int | None) -> Target:
    """``skyroute run --workers N`` on ``config``; the Target measures all its processes."""
    log = procs.tmp / f"{name}.log"
    # Below info, skyroute does not log its URL: give it a free port instead of 0.
    port = None if args.skyroute_log_level in ("debug", "info") else free_port()
    with log.open("wb") as log_file:
        sky = procs.spawn(name, [
            *shlex.split(args.skyroute_cmd), "--log-format", "json", "--log-level",
            args.skyroute_log_level, "run", "-c", str(config), "--port", str(port or 0),
            "--grace", "1", "--workers", str(workers)], core=core,
            stdout=subprocess.DEVNULL, stderr=log_file)
    url = wait_for_listening(sky, log, port,
                             "server_started" if workers == 1 else "workers_started")
    if workers > 1 and port is not None:  # no log line to wait for: until every worker is up
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(worker_pids(log)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
    pids = (sky.pid, *worker_pids(log)) if workers > 1 else (sky.pid,)
    return Target(name, url + "/v1/chat/completions", CLIENT_KEY, "chat", pids)


def check_alive(procs: Procs) -> None:
    for name, proc in procs.procs:
        if proc.poll() is not None and name not in procs.stopped:
            raise RuntimeError(f"{name} died during the run (status {proc.returncode})")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6000,
                    help="max measured requests per phase (default 6000)")
    ap.add_argument("--seconds", type=float, default=6.0,
                    help="max measured seconds per phase (default 6)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="warm-up seconds per phase, not measured (default 1)")
    ap.add_argument("--warmup-requests", type=int, default=500,
                    help="max warm-up requests per phase (default 500)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per (mode, concurrency); each gives every target 1/rounds of "
                         "the budget in turn (default 3)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64],
                    help="concurrency levels (default 1 64)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                    help="json (non-streaming) and/or stream (default both)")
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                    help="targets to measure (default all; the summary needs all three)")
    ap.add_argument("--tokens", type=int, default=5, help="tokens per answer (default 5)")
    ap.add_argument("--skyroute-cmd",
                    default=f"{shlex.quote(sys.executable)} -m skyroute.proxy.cli",
                    help="command that runs skyroute's CLI (default: this Python, "
                         "-m skyroute.proxy.cli, with the repo on PYTHONPATH)")
    ap.add_argument("--skyroute-log-level", default="info",
                    choices=["debug", "info", "warning", "error"],
                    help="skyroute --log-level (default info: one access line per request, "
                         "as in production)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false",
                    help="skip the --workers 1 / --workers 2 comparison")
    ap.add_argument("--short", action="store_true",
                    help="a quick run for CI: 400 requests / 1 s per phase, one round, "
                         "concurrency 1 and 16")
    args = ap.parse_args(argv)
    if args.short:
        args.requests, args.seconds, args.rounds = 400, 1.0, 1
        args.warmup, args.warmup_requests, args.concurrency = 0.3, 100, [1, 16]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = os.sched_getaffinity(0)
    pinned = {LOAD_CORE, PROXY_CORE} <= cpus and shutil.which("taskset") is not None
    if pinned:
        os.sched_setaffinity(0, {LOAD_CORE})  # the upstream inherits core 0 too
    else:
        print("warning: cannot pin to cores 0 and 1 (need 2 CPUs and taskset); unpinned",
              file=sys.stderr)
    procs = Procs()
    # Turn SIGTERM into an exception so that `finally` stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        up = procs.spawn("upstream", [sys.executable, str(HERE / "_upstream.py"), UPSTREAM_KEY,
                                      str(args.tokens)], core=None, stdout=subprocess.PIPE)
        upstream_url = read_url_line(up, "upstream")
        bare = procs.spawn("bare", [sys.executable, str(HERE / "_passthrough.py"), upstream_url,
                                    UPSTREAM_KEY], core=PROXY_CORE if pinned else None,
                           stdout=subprocess.PIPE)
        bare_url = read_url_line(bare, "bare pass-through")
        config = procs.tmp / "routing.yaml"
        config.write_text(routing_yaml(upstream_url))
        sky = start_skyroute(procs, args, config, "skyroute", workers=1,
                             core=PROXY_CORE if pinned else None)
        path = "/v1/chat/completions"
        print(f"upstream {upstream_url} (pid {up.pid}); bare pass-through {bare_url} "
              f"(pid {bare.pid}); skyroute {sky.url.removesuffix(path)} (pid {sky.pids[0]})",
              file=sys.stderr)
        path = "/chat/completions"  # the upstream's base URL ends in /v1 already
        targets = [
            Target("direct", upstream_url + path, UPSTREAM_KEY, "deepseek-chat", ()),
            Target("bare", bare_url + "/v1" + path, UPSTREAM_KEY, "deepseek-chat", (bare.pid,)),
            sky,
        ]
        targets = [t for t in targets if t.name in args.targets]
        idle = {t.name: memory_mib(t.pids, "VmRSS") for t in targets}
        phases = uvloop.run(measure(targets, args))
        check_alive(procs)
        result = report(phases, args)
        print(memory_line(targets, idle), flush=True)
        if args.scaling:
            # Nothing pinned from here on: every process may use every core.
            os.sched_setaffinity(0, cpus)
            os.sched_setaffinity(up.pid, cpus)
            procs.stop_one("skyroute")
            procs.stop_one("bare")
            scaling = [start_skyroute(procs, args, config, name, workers=n, core=None)
                       for name, n in zip(SCALING_TARGETS, (1, 2), strict=True)]
            top = max(args.concurrency)
            idle = {t.name: memory_mib(t.pids, "VmRSS") for t in scaling}
            scaled = uvloop.run(measure(scaling, argparse.Namespace(
                **{**vars(args), "concurrency": [top]})))
            check_alive(procs)
            result["scaling"] = report_scaling(scaled, args)
            print(memory_line(scaling, idle), flush=True)
        if args.json:
            result["config"] = {k: v for k, v in vars(args).items() if k != "json"}
            result["pinned"] = pinned
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nresults written to {args.json}")
        return 1 if any(p.errors for p in phases) else 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop()


if __name__ == "__main__":
    sys.exit(main())
