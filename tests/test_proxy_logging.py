"""Log events: stable snake_case names, all in the README table, and safe library records."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, InvalidHeader, LineTooLong
from skyroute.proxy._logging import (
    FLUSH_AFTER_S,
    PIPE_BUF,
    BatchedLines,
    StdlibBridge,
    add_timestamp,
    parse_error_reason,
    printable,
    render_json,
)
from skyroute.proxy._state import STATE_SYNC

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "hi"}]
SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
#: A log call's event name: ``log.info("name"`` or ``getattr(log, level)("name"``.
_LOG_CALL = re.compile(r"(?:\.(?:debug|info|warning|error|exception)"
                       r"|getattr\((?:[^()]|\([^()]*\))*\))\(\s*\"([^\"]*)\"")


def _documented_events() -> dict[str, str]:
    """Event name -> level column of README's "Log events" table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Log events", 1)[1].split("\n#", 1)[0]
    return {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `([^`]+)` \| ([^|]+) \|", section, flags=re.M)}


def _events_in_code() -> set[str]:
    names = set()
    for folder in ("proxy", "statesync", "routing"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(_LOG_CALL.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_event_in_the_code_is_snake_case_and_in_the_README_table():
    """Each log call's event name is snake_case and documented, and the table names no other."""
    in_code, documented = _events_in_code(), set(_documented_events())
    assert in_code, "no log calls found: the pattern is out of date"
    assert not {name for name in in_code if not SNAKE_CASE.fullmatch(name)}
    assert in_code - documented == set(), "log events missing from README's table"
    assert documented - in_code == set(), "README's table lists events nothing logs"


@pytest.fixture
def stdlib_bridge() -> Iterator[None]:
    """Library records (aiohttp's) go to structlog, as ``configure_logging`` sets up."""
    root, bridge = logging.getLogger(), StdlibBridge()
    root.addHandler(bridge)
    try:
        yield
    finally:
        root.removeHandler(bridge)


async def _send_raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    async with asyncio.timeout(CALL_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return await reader.read()
    finally:
        writer.close()


async def test_a_busy_run_logs_only_documented_snake_case_events(
        standin, skyroute, captured_logs: list[dict[str, Any]], stdlib_bridge):
    """Failover, a breaker opening and closing, reloads good and bad, a malformed request and
    a document rotation without sync log only named events from README's table, none sync_*."""
    a, b = await standin("a"), await standin("b")
    route = "- model: chat\n  targets: [a, b]\n  strategy: priority\n"
    text = routing_yaml([entry(a), entry(b)], route,
                        extra="breaker:\n  consecutive_failures: 2\n  cooldown: 100ms\n")
    server = await skyroute(text)

    async def state_of(name: str) -> str:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
            health = await (await http.get(f"{server.url}/health")).json()
        return str(health["upstreams"][name]["state"])

    a.behaviour.mode = "error"
    async with client_for(server) as client:
        for _ in range(3):  # a fails twice (breaker opens), b answers every time
            await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert await state_of("a") == "open"
        a.behaviour.mode = "ok"

        async def a_is_back() -> bool:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
            return await state_of("a") == "healthy"

        await eventually(a_is_back, timeout=10)

        moved = text.replace("listen: 127.0.0.1:0\n", "listen: 127.0.0.1:1\n")
        server.config_path.write_text(moved)
        await eventually(lambda: any(e["event"] == "config_reloaded" for e in captured_logs))
        server.config_path.write_text(text.replace("targets: [a, b]", "targets: [a, nowhere]"))
        await eventually(lambda: any(e["event"] == "config_reload_refused"
                                     for e in captured_logs))
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    answer = await _send_raw(server.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                         b"Authorization: Bearer sk-\x01secret\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    await server.app[STATE_SYNC].rotate()  # no sync section: rotates, says nothing

    names = {e["event"] for e in captured_logs}
    assert {"server_started", "request_finished", "upstream_attempt_failed",
            "upstream_state_changed", "route_level_changed", "config_reloaded",
            "listen_change_ignored", "config_reload_refused",
            "client_request_malformed"} <= names
    changes = {(e["from"], e["to"]) for e in captured_logs
               if e["event"] == "upstream_state_changed" and e["upstream"] == "a"}
    assert ("healthy", "open") in changes and any(to == "healthy" for _, to in changes)
    assert not {name for name in names if not SNAKE_CASE.fullmatch(name)}
    assert names - set(_documented_events()) == set()
    assert not [name for name in names if name.startswith("sync_")]
    [malformed] = [e for e in captured_logs if e["event"] == "client_request_malformed"]
    assert malformed["peer"] == "127.0.0.1" and "secret" not in repr(malformed)


@pytest.mark.parametrize(("error", "reason"), [
    # llhttp puts the bytes it choked on after a colon, on later lines
    (BadHttpMessage("Invalid header value char:\n\n  b'Authorization: sk-\\x01key'\n  ^"),
     "Invalid header value char"),
    (InvalidHeader(b"sk-\x01key"), "Invalid HTTP header"),  # aiohttp's pure-Python parser
    (LineTooLong(b"a" * 100, 8190), "Got more than 8190 bytes when reading"),
    (BadHttpMethod("G\x01T /v1 HTTP/1.1"), "Bad HTTP method in status line"),
    (BadHttpMessage("\x1b[31m"), "\\x1b[31m"),  # no marker: escaped, never raw
    (BadHttpMessage(""), "BadHttpMessage"),
])
def test_parse_error_reason_keeps_the_description_and_drops_client_bytes(error, reason):
    """The reason is the parser's own words before the client's bytes begin, escaped."""
    assert parse_error_reason(error) == reason


def test_printable_escapes_control_characters_and_cuts_to_the_limit():
    """Control characters become escapes and long text ends in '...' at the limit."""
    assert printable("a\x01b\nc", 20) == "a\\x01b\\nc"
    assert printable("x" * 30, 10) == "x" * 10 + "..."


def test_timestamps_are_iso_utc_with_microseconds_as_structlog_writes_them():
    stamped = add_timestamp(None, "info", {})["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamped)
    when = datetime.datetime.fromisoformat(stamped.replace("Z", "+00:00"))
    now = datetime.datetime.now(tz=datetime.UTC)
    assert abs((now - when).total_seconds()) < 60


class _Custom:
    def __structlog__(self) -> str:
        return "custom"


def test_json_lines_are_json_dumps_byte_for_byte():
    event = {"event": "x", "n": 1, "f": 0.25, "text": "é \"q\"", "none": None,
             "custom": _Custom(), "other": object(), "nested": {"a": [1, 2]}}
    expected = json.dumps(event, default=lambda o: o.__structlog__()
                          if hasattr(o, "__structlog__") else repr(o))
    assert render_json(None, "info", event) == expected


class _Writes:
    """A text file stand-in that keeps each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


async def test_lines_in_a_running_loop_go_out_together_within_the_flush_delay():
    """A busy loop's lines are one write (not one per line), out within FLUSH_AFTER_S."""
    out = _Writes()
    lines = BatchedLines(out)
    for n in range(5):
        lines.info(f"line {n}")
    assert out.writes == []
    await eventually(lambda: bool(out.writes), timeout=FLUSH_AFTER_S * 40)
    assert out.writes == ["line 0\nline 1\nline 2\nline 3\nline 4\n"]


async def test_each_write_is_whole_lines_of_at_most_pipe_buf_bytes():
    """Workers share stderr: every write is whole lines within PIPE_BUF (atomic on a pipe)."""
    out = _Writes()
    lines = BatchedLines(out)
    sent = [f"{n:04d} " + "x" * (n % 300) for n in range(200)]
    for line in sent:
        lines.info(line)
    lines.info("y" * (PIPE_BUF + 10))  # longer than PIPE_BUF: alone in its write
    lines.flush()
    assert "".join(out.writes) == "\n".join([*sent, "y" * (PIPE_BUF + 10)]) + "\n"
    assert all(w.endswith("\n") and (len(w) <= PIPE_BUF or w.count("\n") == 1)
               for w in out.writes)
    assert len(out.writes) < 30  # batched, not one write per line


def test_lines_batched_in_a_loop_that_closed_come_out_with_the_next_line():
    """A loop that ends before its batch's timer (a test's, a CLI command's) loses nothing:
    the next line, written outside any loop, takes the batch with it."""
    out = _Writes()
    lines = BatchedLines(out)

    async def log_some() -> None:
        lines.info("in the loop")

    asyncio.run(log_some())
    assert out.writes == []  # its timer never ran
    lines.info("after the loop")
    assert out.writes == ["in the loop\nafter the loop\n"]

    async def log_again() -> None:  # and a new loop schedules its own write
        lines.info("next loop")
        await eventually(lambda: len(out.writes) == 2, timeout=FLUSH_AFTER_S * 40)

    asyncio.run(log_again())
    assert out.writes[1] == "next loop\n"


_EXIT_SCRIPT = """
import asyncio, os, sys
import structlog
from skyroute.proxy._logging import configure_logging
from skyroute.proxy._workers import _exit_now

configure_logging(json=True)
log = structlog.get_logger("test")

async def main():
    for n in range(300):
        log.info("request_finished", n=n)
    if sys.argv[1] == "os_exit":
        _exit_now()  # a worker giving up on a drain: no atexit
    # returns at once: the loop closes before the batch's timer fires

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["return", "os_exit"])
def test_no_line_is_lost_when_the_process_exits_with_lines_batched(how):
    """Lines still in a batch when the process exits (normally, or by the worker's
    ``os._exit`` after a hung drain) are all written, each whole."""
    done = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, how], capture_output=True,
                          text=True, timeout=CALL_TIMEOUT_S * 3, cwd=REPO)
    assert done.returncode == (1 if how == "os_exit" else 0), done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["n"] for e in events] == list(range(300))
