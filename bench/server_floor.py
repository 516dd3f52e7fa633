"""Benchmark: what each layer of a pass-through costs in instructions per request (issue 14).

Four proxies, each differing from the one before in one layer, forward the same JSON
request and the same streamed (SSE) one to the same stand-in upstream
(``bench/_upstream.py``):

  (a) bare: aiohttp's server + aiohttp's ``ClientSession`` (``bench/_passthrough.py``,
      the baseline of ``bench/instructions.py``);
  (b) aiohttp's server + skyroute's lean upstream client (``--client lean``);
  (c) a minimal asyncio Protocol server with ``httptools`` + the lean client
      (``--server protocol``: the request parsed, the answer written straight to the
      transport, keep-alive);
  (d) skyroute itself, one route (``skyroute run --workers 1``, info logging), as
      ``bench/instructions.py`` runs it.

Counted as ``bench/instructions.py`` counts (its machinery): each proxy under
``valgrind --tool=callgrind``, counters zeroed after a warm-up, requests sent one after
another on one keep-alive connection, counters dumped. Before counting, (b) and (c) must
answer what (a) answers, on one keep-alive connection, a JSON answer then a streamed one:
the same status line and headers in the same order (``Date`` aside) and the same body (the
upstream's per-answer id and time aside; a stream compared de-chunked, since its chunks
follow the upstream's writes), every answer framed as llhttp (``httptools``) accepts.

Printed: instructions per request of each, over (a); (b)/(a) and (c)/(a), what the client
and then the server layer cost; and the projection "skyroute with a server like (c)":
(d) - ((b) - (c)) over (a), with how much of skyroute's own work ((d) - (b): routing,
auth, headers, metrics, the access log) would still stand above the 1.2x goal. Each
process is also counted idle for as long as its requests took ("idle": timers, which
valgrind's slowdown makes weigh ~50x more per request than in a real run), and the
projection is repeated net of that.

Usage: python bench/server_floor.py [--requests 200] [--warmup 50] [--tokens 5] [--short]
                                   [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httptools

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from instructions import GOAL, START_TIMEOUT_S, _counted, _send, _valgrind  # noqa: E402
from overhead import (  # noqa: E402 - the sibling benchmarks' helpers
    CLIENT_KEY,
    UPSTREAM_KEY,
    Procs,
    body_for,
    read_url_line,
    routing_yaml,
    wait_for_listening,
)

MODES = ("json", "stream")
CHECK_TIMEOUT_S = 60.0  # one answer from a proxy under valgrind


@dataclass(frozen=True, slots=True)
class Row:
    """One proxy compared: a variant of ``bench/_passthrough.py`` (its options), or skyroute."""

    name: str
    label: str
    passthrough_args: tuple[str, ...] | None  # None: skyroute


ROWS = (
    Row("a", "aiohttp server + aiohttp client (bare)", ()),
    Row("b", "aiohttp server + lean client", ("--client", "lean")),
    Row("c", "Protocol+httptools server + lean client",
        ("--client", "lean", "--server", "protocol")),
    Row("d", "skyroute (one route)", None),
)


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer as the client got it: the raw head, and the body without its framing."""

    head: bytes
    body: bytes


class _AnswerReader:
    """httptools callbacks for one answer."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.keep_alive = False
        self.complete = False

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # known once the head is in

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def exchange(url: str, key: str, model: str) -> list[Answer]:
    """A JSON then a streamed chat completion on one connection, each answer read whole.

    Raises:
        RuntimeError: an answer is not a complete 200 of the kind asked for, or the
            connection closed after the first.
    """
    parts = urlsplit(url)
    answers = []
    with socket.create_connection((parts.hostname, parts.port), CHECK_TIMEOUT_S) as sock:
        for stream in (False, True):
            body = body_for(model, stream)
            sock.sendall(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            reader = _AnswerReader()
            raw = b""
            while not reader.complete:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError(f"{url}: connection closed mid-answer: {raw[:300]!r}")
                raw += data
                reader.parser.feed_data(data)  # raises HttpParserError on a malformed answer
            text = b"".join(reader.body)
            if reader.parser.get_status_code() != 200 or not reader.keep_alive or not (
                    text.endswith(b"data: [DONE]\n\n") if stream else b'"choices"' in text):
                raise RuntimeError(f"{url}: unexpected answer {raw[:300]!r}")
            answers.append(Answer(head=raw[:raw.index(b"\r\n\r\n") + 4], body=text))
    return answers


_DATE = re.compile(rb"^(Date: )[^\r]*", re.MULTILINE | re.IGNORECASE)
_VARYING = re.compile(rb'chatcmpl-[0-9a-f]+|"created": \d+')


def _normalised(answer: Answer) -> tuple[bytes, bytes]:
    """What must be the same byte for byte: all but the date and the upstream's id/time."""
    return _DATE.sub(rb"\1-", answer.head), _VARYING.sub(b"-", answer.body)


def check_same_answers(reference: list[Answer], other: list[Answer], name: str) -> None:
    """Raises RuntimeError naming the first difference between two ``exchange`` results."""
    for mode, ref, got in zip(MODES, reference, other, strict=True):
        (ref_head, ref_body), (head, body) = _normalised(ref), _normalised(got)
        if head != ref_head:
            raise RuntimeError(f"({name}) {mode}: head differs from (a)'s:\n{head!r}\n"
                               f"(a): {ref_head!r}")
        if body != ref_body:
            raise RuntimeError(f"({name}) {mode}: body differs from (a)'s:\n{body[:500]!r}\n"
                               f"(a): {ref_body[:500]!r}")


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Start the upstream and the four proxies, check their answers, count each.

    Returns instructions per request by row and mode, and what was checked of each row.
    """
    procs = Procs()
    counts: dict[str, dict[str, float]] = {}
    checks: dict[str, str] = {}
    try:
        up = procs.spawn("upstream", [sys.executable, str(HERE / "_upstream.py"), UPSTREAM_KEY,
                                      str(args.tokens)], core=None, stdout=subprocess.PIPE)
        upstream_url = read_url_line(up, "upstream")
        config = procs.tmp / "routing.yaml"
        config.write_text(routing_yaml(upstream_url))
        started = []
        for row in ROWS:  # all start at once: under valgrind each takes a while
            out = procs.tmp / f"{row.name}.cg"
            if row.passthrough_args is None:
                log = procs.tmp / "skyroute.log"
                with log.open("wb") as log_file:
                    proc = procs.spawn(row.name, [
                        *_valgrind(out), *shlex.split(args.skyroute_cmd), "--log-format",
                        "json", "--log-level", "info", "run", "-c", str(config), "--port", "0",
                        "--grace", "1", "--workers", "1"],
                        core=None, stdout=subprocess.DEVNULL, stderr=log_file)
            else:
                log = None
                proc = procs.spawn(row.name, [
                    *_valgrind(out), sys.executable, str(HERE / "_passthrough.py"),
                    upstream_url, UPSTREAM_KEY, *row.passthrough_args],
                    core=None, stdout=subprocess.PIPE)
            started.append((row, proc, out, log))
        targets = []
        for row, proc, out, log in started:
            base = (wait_for_listening(proc, log, None, timeout_s=START_TIMEOUT_S) if log
                    else read_url_line(proc, f"({row.name})"))
            key, model = (CLIENT_KEY, "chat") if log else (UPSTREAM_KEY, "deepseek-chat")
            targets.append((row, proc, out, base + "/v1/chat/completions", key, model))
        reference: list[Answer] = []
        for row, _, _, url, key, model in targets:
            answers = exchange(url, key, model)
            if row.name == "a":
                reference, check = answers, "reference"
            elif row.passthrough_args is not None:
                check_same_answers(reference, answers, row.name)
                check = "same answers as (a)"
            else:
                check = "complete 200 answers"
            checks[row.name], counts[row.name] = check, {}
            print(f"  ({row.name}) answers checked: {check}", file=sys.stderr, flush=True)
        for mode in MODES:
            stream = mode == "stream"
            for row, proc, out, url, key, model in targets:
                _send(url, key, model, stream=stream, count=args.warmup)
                started_at = time.monotonic()
                total = _counted(proc.pid, out, functools.partial(
                    _send, url, key, model, stream=stream, count=args.requests))
                elapsed = time.monotonic() - started_at
                # Timers run by the clock, and valgrind makes a request ~50x slower: what the
                # process does idle for as long is shown apart (as instructions.py --workers).
                idle = _counted(proc.pid, out, functools.partial(time.sleep, elapsed))
                counts[row.name][mode] = total / args.requests
                counts[row.name][f"{mode}_idle"] = idle / args.requests
                print(f"  {mode:6} ({row.name}) {total / args.requests / 1e3:9.0f} k "
                      f"instr/request ({idle / args.requests / 1e3:.0f} k idle)",
                      file=sys.stderr, flush=True)
    finally:
        procs.stop()
    return counts, checks


def summary(counts: dict[str, dict[str, float]], *, net: bool = False
            ) -> dict[str, dict[str, float]]:
    """Per mode: the layer ratios, the projection and what of skyroute's own work is over;
    with ``net``, of the counts less what each process did idle for as long."""
    out = {}
    for mode in MODES:
        a, b, c, d = (counts[name][mode] - (counts[name][f"{mode}_idle"] if net else 0.0)
                      for name in "abcd")
        projected = d - (b - c)
        own = d - b
        room = GOAL * a - c  # what skyroute's own work may add to (c) within the goal
        out[mode] = {"client_layer": b / a, "server_layer": c / a, "skyroute": d / a,
                     "projected": projected, "projected_ratio": projected / a,
                     "own_work": own, "room": room, "over": own - room}
    return out


def report(counts: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    sums = summary(counts)
    print(f"\ninstructions per request (callgrind; {args.requests} requests in a row after "
          f"{args.warmup} warm-up, one keep-alive connection; {args.tokens} tokens an answer, "
          f"{args.tokens + 3} events a stream; k = 1,000)")
    print("| row | JSON k | / (a) | idle k | SSE k | / (a) | idle k |\n"
          "|---|---|---|---|---|---|---|")
    for row in ROWS:
        values = counts[row.name]
        cells = " | ".join(f"{values[m] / 1e3:,.0f} | {values[m] / counts['a'][m]:.2f}x | "
                           f"{values[f'{m}_idle'] / 1e3:,.0f}" for m in MODES)
        print(f"| ({row.name}) {row.label} | {cells} |")
    j, s = sums["json"], sums["stream"]
    print(f"| skyroute with a server like (c): (d) - ((b) - (c)) | {j['projected'] / 1e3:,.0f} "
          f"| {j['projected_ratio']:.2f}x | | {s['projected'] / 1e3:,.0f} | "
          f"{s['projected_ratio']:.2f}x | |")
    print("(idle k: instructions of the same process with no request, for as long as the "
          "requests took, per request: timers, which valgrind's ~50x slowdown weighs ~50x "
          "more than a real run does)")
    print(f"\nlayers: lean client (b)/(a) {j['client_layer']:.2f}x JSON, "
          f"{s['client_layer']:.2f}x SSE; Protocol server and lean client (c)/(a) "
          f"{j['server_layer']:.2f}x JSON, {s['server_layer']:.2f}x SSE")
    nets = summary(counts, net=True)
    for mode, label in (("json", "JSON"), ("stream", "SSE")):
        m, n = sums[mode], nets[mode]
        print(f"{label}: skyroute's own work (d) - (b) = {m['own_work'] / 1e3:,.0f} k; on a "
              f"server like (c) the {GOAL}x goal leaves it {GOAL} x (a) - (c) = "
              f"{m['room'] / 1e3:,.0f} k: {_verdict(m)} the goal. Net of idle: "
              f"{n['projected_ratio']:.2f}x, own work {n['own_work'] / 1e3:,.0f} k, "
              f"{_verdict(n)} the goal")


def _verdict(m: dict[str, float]) -> str:
    if m["over"] <= 0:
        return f"{-m['over'] / 1e3:,.0f} k below"
    return f"{m['over'] / 1e3:,.0f} k ({m['over'] / m['own_work']:.0%} of it) above"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests counted per phase")
    ap.add_argument("--warmup", type=int, default=50, help="requests before counting")
    ap.add_argument("--short", action="store_true",
                    help="20 requests after 5 warm-up (for CI: checks, not numbers)")
    ap.add_argument("--tokens", type=int, default=5,
                    help="tokens per answer: a stream has this many + 3 events (role, stop, "
                         "[DONE]); 5 as in bench/instructions.py")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--skyroute-cmd", default=f"{shlex.quote(sys.executable)} -m "
                                              "skyroute.proxy.cli",
                    help="command that runs skyroute's CLI")
    args = ap.parse_args(argv)
    if args.short:
        args.requests, args.warmup = 20, 5
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("needs valgrind (callgrind_control)", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONHASHSEED", "0")  # as bench/instructions.py: stable layouts
    counts, checks = measure(args)
    report(counts, args)
    if args.json:
        rows = {row.name: {"label": row.label, "check": checks[row.name], **counts[row.name]}
                for row in ROWS}
        args.json.write_text(json.dumps({"requests": args.requests, "warmup": args.warmup,
                                         "tokens": args.tokens, "rows": rows,
                                         "summary": summary(counts),
                                         "summary_net_of_idle": summary(counts, net=True)},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
