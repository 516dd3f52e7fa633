"""Benchmark: CPU instructions per request of skyroute and of a bare pass-through.

Timing on a shared, loaded machine is noise; the number of instructions a process
executes for one request is not. Each proxy runs under ``valgrind --tool=callgrind``
(in front of the same stand-in upstream, ``bench/_upstream.py``, which runs normally):
after a warm-up its counters are zeroed (``callgrind_control --zero``), a number of
requests are sent one after another on one keep-alive connection, and the counters
are dumped (``callgrind_control --dump``). Printed: instructions per request, for JSON
and streamed chat completions, skyroute (``skyroute run --workers 1``, info logging:
one access line per request, as in production) over the bare 40-line aiohttp+uvloop
pass-through (``bench/_passthrough.py``). Goal (issue 14): at most 1.2x.

With ``--keep DIR`` the callgrind dumps stay in DIR: ``callgrind_annotate
DIR/skyroute-json.out`` shows where skyroute's instructions go (C functions). The
Python-level split is what ``--profile`` prints: one more skyroute of the same run, not
under valgrind, takes the same warm-up and then the counted JSON and streamed requests
under cProfile (started and stopped by SIGUSR1/SIGUSR2, so start-up is not in it), and
its top 25 functions by own time (``tottime``) are printed at the end.

With ``--workers``, also a worker of a ``--workers 2`` pair (a statesync peer of its
sibling, prometheus_client's multiprocess files; this process starts the pair as the
supervisor would, only the worker under valgrind gets requests) against one process:
instructions per request as counted, the idle instructions per second of each (timers run by
the clock, and valgrind makes a request ~50x slower, so they weigh ~50x more per request than
in a real run), and per request net of those. Goal (issue 14): the same per request.

Usage: python bench/instructions.py [--requests 200] [--warmup 50] [--keep DIR] [--workers]
                                   [--profile]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import os
import pstats
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import (  # noqa: E402 - the sibling benchmark's helpers
    CLIENT_KEY,
    UPSTREAM_KEY,
    Procs,
    body_for,
    free_port,
    read_url_line,
    routing_yaml,
    wait_for_listening,
)

#: valgrind runs Python some 50x slower: starting skyroute takes a while.
START_TIMEOUT_S = 180.0
GOAL = 1.2
_TOTAL = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            "--collect-systime=no", "-q"]


def _send(url: str, key: str, model: str, *, stream: bool, count: int) -> None:
    """``count`` chat completions one after another on one keep-alive connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    body = body_for(model, stream)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        for _ in range(count):
            conn.request("POST", parts.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200 or not (data.endswith(b"data: [DONE]\n\n") if stream
                                          else b'"choices"' in data):
                raise RuntimeError(f"{url}: answer {resp.status} {data[:200]!r}")
    finally:
        conn.close()


def _control(command: str, pid: int) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _counted(pid: int, out: Path, send: Callable[[], None]) -> int:
    """Instructions the process ``pid`` executes while ``send()`` runs."""
    _control("--zero", pid)
    send()
    before = set(out.parent.glob(out.name + "*"))
    _control("--dump", pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fresh = set(out.parent.glob(out.name + "*")) - before
        for dump in fresh:
            match = _TOTAL.search(dump.read_bytes())
            if match:
                dump.unlink()
                return int(match.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"no callgrind dump from pid {pid}")


def _worker_pair(procs: Procs, args: argparse.Namespace, config: Path, out: Path
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """Worker 0 of a ``--workers 2`` pair (under callgrind) and its sibling (not).

    This process plays the supervisor (``skyroute.proxy._workers``: a ``WorkerSpec`` each,
    sync sockets, a multiprocess metrics directory), so that only worker 0 runs under
    valgrind and only it gets requests: the sibling listens on a port of its own. Worker 0
    is a statesync peer of the sibling and writes prometheus_client's multiprocess files,
    as under ``skyroute run --workers 2``. Returns worker 0 and its URL.
    """
    from skyroute.proxy._workers import WORKER_ENV, WorkerSpec

    metrics = procs.tmp / "metrics"
    metrics.mkdir()
    syncs = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.set_inheritable(True)
        syncs.append(sock)
    sync_ports = [s.getsockname()[1] for s in syncs]
    http_ports = [free_port(), free_port()]
    started = []
    for index in (1, 0):  # the sibling first: it starts in seconds, worker 0 in minutes
        ready_r, ready_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()  # kept open: closed, the worker would drain
        procs.lifelines.append(lifeline_w)
        spec = WorkerSpec(index=index, token="bench-sync-token", sync_fd=syncs[index].fileno(),
                          peer_ports=(sync_ports[1 - index],), ready_fd=ready_w,
                          lifeline_fd=lifeline_r)
        log = procs.tmp / f"worker{index}.log"
        with log.open("wb") as log_file:
            proc = procs.spawn(
                f"worker{index}",
                [*(_valgrind(out) if index == 0 else []), *shlex.split(args.skyroute_cmd),
                 "--log-format", "json", "--log-level", "info", "run", "-c", str(config),
                 "--port", str(http_ports[index]), "--grace", "1", "--workers", "1"],
                core=None, env={WORKER_ENV: spec.to_env(), "PROMETHEUS_MULTIPROC_DIR":
                                str(metrics)},
                pass_fds=(syncs[index].fileno(), ready_w, lifeline_r),
                stdout=subprocess.DEVNULL, stderr=log_file)
        os.close(ready_w)
        os.close(lifeline_r)
        started.append((proc, ready_r, log))
    for _, ready_r, log in started:
        ready, _, _ = select.select([ready_r], [], [], START_TIMEOUT_S)
        if not ready or not os.read(ready_r, 1):
            raise RuntimeError(f"worker did not start:\n{log.read_text()[-3000:]}")
        os.close(ready_r)
    return started[1][0], f"http://127.0.0.1:{http_ports[0]}"


#: Run in the profiled skyroute: SIGUSR1 starts cProfile, SIGUSR2 stops it and writes the
#: stats, each then touching a file (argv[1], argv[2]) so the bench knows it happened.
PROFILED = """
import cProfile, pathlib, signal, sys
from skyroute.proxy.cli import main
prof, started, written = cProfile.Profile(), pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def start(*_): prof.enable(); started.touch()
def stop(*_): prof.disable(); prof.dump_stats(written); written.with_suffix(".done").touch()
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.exit(main(sys.argv[3:]))
"""


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the profiled skyroute did not write {path.name}:\n"
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.05)


def profile(procs: Procs, args: argparse.Namespace, config: Path) -> pstats.Stats:
    """cProfile of a skyroute (``--workers 1``, not under valgrind) over the same requests
    as the measured one: the warm-up unprofiled, then the counted JSON and streamed ones."""
    started, stats = procs.tmp / "profile.started", procs.tmp / "skyroute.prof"
    log = procs.tmp / "profiled.log"
    with log.open("wb") as log_file:
        proc = procs.spawn("profiled", [
            sys.executable, "-c", PROFILED, str(started), str(stats), "--log-format", "json",
            "--log-level", "info", "run", "-c", str(config), "--port", "0", "--grace", "1",
            "--workers", "1"], core=None, stdout=subprocess.DEVNULL, stderr=log_file)
    url = wait_for_listening(proc, log, None, timeout_s=START_TIMEOUT_S) + "/v1/chat/completions"
    for stream in (False, True):
        _send(url, CLIENT_KEY, "chat", stream=stream, count=args.warmup)
    proc.send_signal(signal.SIGUSR1)
    _wait_for_file(started, proc, log)
    for stream in (False, True):
        _send(url, CLIENT_KEY, "chat", stream=stream, count=args.requests)
    proc.send_signal(signal.SIGUSR2)
    _wait_for_file(stats.with_suffix(".done"), proc, log)
    procs.stop_one("profiled")
    return pstats.Stats(str(stats))


def measure(args: argparse.Namespace, keep: Path | None) -> dict[str, dict[str, float]]:
    procs = Procs()
    results: dict[str, dict[str, float]] = {}
    try:
        up = procs.spawn("upstream", [sys.executable, str(HERE / "_upstream.py"), UPSTREAM_KEY],
                         core=None, stdout=subprocess.PIPE)
        upstream_url = read_url_line(up, "upstream")
        config = procs.tmp / "routing.yaml"
        config.write_text(routing_yaml(upstream_url))
        bare_out, sky_out = procs.tmp / "bare.cg", procs.tmp / "skyroute.cg"
        bare = procs.spawn("bare", [*_valgrind(bare_out), sys.executable,
                                    str(HERE / "_passthrough.py"), upstream_url, UPSTREAM_KEY],
                           core=None, stdout=subprocess.PIPE)
        bare_url = read_url_line(bare, "bare pass-through") + "/v1/chat/completions"
        log = procs.tmp / "skyroute.log"
        with log.open("wb") as log_file:
            sky = procs.spawn("skyroute", [
                *_valgrind(sky_out), *shlex.split(args.skyroute_cmd), "--log-format", "json",
                "--log-level", "info", "run", "-c", str(config), "--port", "0", "--grace", "1",
                "--workers", "1"], core=None, stdout=subprocess.DEVNULL, stderr=log_file)
        sky_url = wait_for_listening(sky, log, None, timeout_s=START_TIMEOUT_S) \
            + "/v1/chat/completions"
        if args.profile:
            args.profile_stats = profile(procs, args, config)
        measured = [("bare", bare, bare_out, bare_url, UPSTREAM_KEY, "deepseek-chat"),
                    ("skyroute", sky, sky_out, sky_url, CLIENT_KEY, "chat")]
        if args.workers:
            worker_out = procs.tmp / "worker.cg"
            worker, worker_url = _worker_pair(procs, args, config, worker_out)
            measured.append(("worker", worker, worker_out,
                             worker_url + "/v1/chat/completions", CLIENT_KEY, "chat"))
        for mode in ("json", "stream"):
            stream = mode == "stream"
            row = results[mode] = {}
            for name, proc, out, url, key, model in measured:
                _send(url, key, model, stream=stream, count=args.warmup)
                started = time.monotonic()
                total = _counted(proc.pid, out, functools.partial(
                    _send, url, key, model, stream=stream, count=args.requests))
                elapsed = time.monotonic() - started
                row[name] = total / args.requests
                if args.workers and name != "bare":
                    # Timers (flushes, pings, metric writes) run by the clock, and under
                    # valgrind the requests take ~50x longer: count them idle as long.
                    idle = _counted(proc.pid, out, functools.partial(time.sleep, elapsed))
                    row[f"{name}_idle_per_s"] = idle / elapsed
                    row[f"{name}_net"] = (total - idle) / args.requests
                print(f"  {mode:6} {name:8} {total / args.requests / 1e3:9.0f} k instr/request",
                      file=sys.stderr, flush=True)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for name, proc, out, url, key, model in (
                    ("bare", bare, bare_out, bare_url, UPSTREAM_KEY, "deepseek-chat"),
                    ("skyroute", sky, sky_out, sky_url, CLIENT_KEY, "chat")):
                _control("--zero", proc.pid)
                _send(url, key, model, stream=False, count=args.requests)
                _control("--dump", proc.pid)
                time.sleep(1.0)
                for dump in sorted(out.parent.glob(out.name + "*")):
                    if dump != out and dump.stat().st_size:
                        shutil.copy(dump, keep / f"{name}-json.out")
    finally:
        procs.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests counted per phase")
    ap.add_argument("--warmup", type=int, default=50, help="requests before counting")
    ap.add_argument("--keep", type=Path, help="keep the callgrind dumps of JSON requests here")
    ap.add_argument("--workers", action="store_true",
                    help="also count a worker of --workers 2 (a statesync peer of a sibling "
                         "worker, multiprocess metrics) against one process")
    ap.add_argument("--skyroute-cmd", default=f"{shlex.quote(sys.executable)} -m "
                                              "skyroute.proxy.cli",
                    help="command that runs skyroute's CLI")
    ap.add_argument("--profile", action="store_true",
                    help="also run skyroute under cProfile with the same requests and print "
                         "its top 25 functions by own time (tottime)")
    args = ap.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("needs valgrind (callgrind_control)", file=sys.stderr)
        return 2
    # A fixed hash seed: dict and set layouts (and so instruction counts) the same each run.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    results = measure(args, args.keep)
    print(f"\ninstructions per request (callgrind; {args.requests} requests in a row after "
          f"{args.warmup} warm-up, one keep-alive connection)")
    print(f"{'mode':6} {'bare k':>9} {'skyroute k':>11} {'skyroute / bare':>16}")
    worst = 0.0
    for mode, row in results.items():
        ratio = row["skyroute"] / row["bare"]
        worst = max(worst, ratio)
        print(f"{mode:6} {row['bare'] / 1e3:9.0f} {row['skyroute'] / 1e3:11.0f} {ratio:15.2f}x")
    print(f"\n{'PASS' if worst <= GOAL else 'FAIL'}  instructions per request at most "
          f"{GOAL}x the bare pass-through's (worst {worst:.2f}x)")
    if args.workers:
        print("\na worker of --workers 2 (statesync peer of its sibling, multiprocess metrics) "
              "against one process (--workers 1)")
        print(f"{'mode':6} {'1 process k':>12} {'worker k':>9} {'worker / 1':>11} "
              f"{'idle k/s 1':>11} {'idle k/s w':>11} {'net 1 k':>8} {'net w k':>8} "
              f"{'net w / 1':>10}")
        for mode, row in results.items():
            print(f"{mode:6} {row['skyroute'] / 1e3:12.0f} {row['worker'] / 1e3:9.0f} "
                  f"{row['worker'] / row['skyroute']:10.3f}x "
                  f"{row['skyroute_idle_per_s'] / 1e3:11.0f} "
                  f"{row['worker_idle_per_s'] / 1e3:11.0f} "
                  f"{row['skyroute_net'] / 1e3:8.0f} {row['worker_net'] / 1e3:8.0f} "
                  f"{row['worker_net'] / row['skyroute_net']:9.3f}x")
        print("(idle k/s: instructions per second with no request, for as long as the requests "
              "took: timers (store flushes, sync pings, metric writes) run by the clock while "
              "valgrind makes each request ~50x slower, so under it they weigh ~50x more per "
              "request than in a real run; net: per request with the idle count taken off)")
    if args.profile:
        print(f"\ncProfile of skyroute ({args.requests} JSON and {args.requests} streamed "
              f"requests after {args.warmup} of each unprofiled; top 25 by own time)",
              flush=True)
        args.profile_stats.sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
