"""The ``skyroute`` command as a user runs it: validate, run (SIGHUP, SIGTERM) and demo."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from skyroute.proxy.cli import _parser

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, eventually, routing_yaml
from .conftest import upstream_yaml as entry

SKYROUTE = [sys.executable, "-m", "skyroute.proxy.cli"]
REPO = Path(__file__).resolve().parent.parent


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *SKYROUTE, *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    async with asyncio.timeout(CALL_TIMEOUT_S * 3):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class _Background:
    """A ``skyroute`` process whose output is read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_line(self, pattern: str, *, stream: str = "stderr") -> re.Match[str]:
        reader = self.proc.stderr if stream == "stderr" else self.proc.stdout
        assert reader is not None
        async with asyncio.timeout(CALL_TIMEOUT_S * 2):
            while True:
                line = (await reader.readline()).decode()
                if not line:
                    raise AssertionError(f"process ended before {pattern!r}: {self.lines}")
                self.lines.append(line)
                match = re.search(pattern, line)
                if match:
                    return match

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(CALL_TIMEOUT_S * 3):
            return await self.proc.wait()


async def _start(*args: str) -> _Background:
    proc = await asyncio.create_subprocess_exec(
        *SKYROUTE, "--log-format", "json", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    return _Background(proc)


BROKEN = """\
listen: 127.0.0.1:0
upstreams:
  - name: a
    url: http://127.0.0.1:1/v1
    api_key: ${SKYROUTE_TEST_UNSET_VAR}
    regoin: x
routes:
  - model: chat
    targets: [a, b]
"""


async def test_validate_lists_every_problem_with_path_and_line(tmp_path):
    """validate prints each problem with file, line and YAML path, and exits non-zero."""
    path = tmp_path / "routing.yaml"
    path.write_text(BROKEN)
    code, _, err = await _run("validate", str(path))
    assert code == 1
    assert f"{path}:5: upstreams[0].api_key: environment variable SKYROUTE_TEST_UNSET_VAR" in err
    assert f"{path}:6: upstreams[0].regoin: unknown key 'regoin'; did you mean 'region'?" in err
    assert f"{path}:9: routes[0].targets[1]: target 'b' names no upstream" in err


async def test_validate_accepts_a_good_file(tmp_path):
    """validate exits 0 and summarises a valid file."""
    path = tmp_path / "routing.yaml"
    path.write_text(BROKEN.replace("    regoin: x\n", "").replace(", b]", "]"))
    code, out, _ = await _run("validate", str(path), env={"SKYROUTE_TEST_UNSET_VAR": "k"})
    assert code == 0, out
    assert "OK" in out


async def test_run_serves_reloads_on_sighup_and_drains_on_sigterm(standin, tmp_path):
    """skyroute run serves the file, reloads it on SIGHUP, and exits cleanly on SIGTERM."""
    up = await standin("us-east")
    path = tmp_path / "routing.yaml"
    path.write_text(routing_yaml([entry(up, models="{chat: deepseek-chat}")]))
    proc = await _start("run", "-c", str(path))
    try:
        url = (await proc.wait_line(r'"url": "(http://[^"]+)"')).group(1)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY,
                                      max_retries=0, timeout=CALL_TIMEOUT_S) as client:
            reply = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
            assert "us-east" in reply.choices[0].message.content
            path.write_text(routing_yaml([entry(up, models="{chat: deepseek-chat, b: x}")]))
            proc.proc.send_signal(signal.SIGHUP)
            await proc.wait_line(r'"event": "config_reloaded"')
            assert sorted([m.id async for m in client.models.list()]) == ["b", "chat"]
        assert await proc.stop() == 0
    finally:
        await proc.stop(signal.SIGKILL)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_right_after_requests_loses_no_access_line(standin, tmp_path, workers):
    """Access lines wait in a batch (``proxy._logging.BatchedLines``); SIGTERM right after a
    burst of requests still writes every one, whole, with its request id and fields."""
    up = await standin("us-east")
    path = tmp_path / "routing.yaml"
    path.write_text(routing_yaml([entry(up, models="{chat: deepseek-chat}")]))
    proc = await _start("run", "-c", str(path), "--workers", workers, "--grace", "5")
    try:
        url = (await proc.wait_line(r'"url": "(http://[^"]+)"')).group(1)
        if workers == "2":
            await proc.wait_line(r'"event": "workers_started"')
        ids = [f"flush-{workers}-{n}" for n in range(40)]
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def ask(request_id: str) -> None:
                async with http.post(f"{url}/v1/chat/completions", json={
                        "model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": f"Bearer {CLIENT_KEY}",
                                 "X-Request-ID": request_id}) as resp:
                    assert resp.status == 200
                    await resp.read()

            await asyncio.gather(*(ask(request_id) for request_id in ids))
        assert await proc.stop() == 0  # at once: the last lines are still batched
        assert proc.proc.stderr is not None
        async with asyncio.timeout(CALL_TIMEOUT_S):
            rest = await proc.proc.stderr.read()
    finally:
        await proc.stop(signal.SIGKILL)
    events = [json.loads(line) for line in [*proc.lines, *rest.decode().splitlines()]]
    finished = {e["request_id"]: e for e in events if e["event"] == "request_finished"}
    assert set(ids) <= set(finished)
    for request_id in ids:
        line = finished[request_id]
        assert {k: line[k] for k in ("method", "path", "status", "route", "upstream",
                                     "attempts", "level")} == {
            "method": "POST", "path": "/v1/chat/completions", "status": 200, "route": "chat",
            "upstream": "us-east", "attempts": 1, "level": "info"}
        assert isinstance(line["latency_ms"], float | int) and line["timestamp"]


async def test_run_refuses_an_invalid_file_at_start(tmp_path):
    """skyroute run with a broken file prints one line per problem and exits 1 unserved."""
    path = tmp_path / "routing.yaml"
    path.write_text(BROKEN)
    code, _, err = await _run("run", "--config", str(path), "--log-format", "console")
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"skyroute: {path}:") for line in lines)
    assert f"skyroute: {path}:6: upstreams[0].regoin: unknown key 'regoin'" in err


#: A valid routing file whose upstream is never called (nothing is served in these tests).
GOOD = """\
listen: 127.0.0.1:0
auth:
  api_keys:
    - name: tests
      key: sk-client-test
upstreams:
  - name: a
    url: http://127.0.0.1:9/v1
    region: x
    models: {chat: deepseek-chat}
routes:
  - model: chat
    targets: [a]
"""


@pytest.mark.parametrize("command", [
    ["run", "-c", "f.yaml"], ["validate", "f.yaml"], ["demo", "--print-config"]])
def test_global_options_go_before_or_after_the_command(command):
    """--log-level and --log-format parse the same before and after run, validate and demo."""
    options = ["--log-level", "debug", "--log-format", "json"]
    before = _parser().parse_args([*options, *command])
    after = _parser().parse_args([*command, *options])
    assert before == after
    assert (after.log_level, after.log_format) == ("debug", "json")
    plain = _parser().parse_args(command)
    assert (plain.log_level, plain.log_format) == ("info", None)


async def test_run_takes_log_options_after_the_command(tmp_path):
    """skyroute run -c f --log-format json --log-level debug serves and logs JSON lines."""
    path = tmp_path / "routing.yaml"
    path.write_text(GOOD)
    proc = await asyncio.create_subprocess_exec(
        *SKYROUTE, "run", "-c", str(path), "--log-format", "json", "--log-level", "debug",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    server = _Background(proc)
    try:
        line = await server.wait_line(r'"event": "server_started"')
        assert json.loads(line.string)["url"].startswith("http://127.0.0.1:")
        assert await server.stop() == 0
    finally:
        await server.stop(signal.SIGKILL)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A 127.0.0.1 port another socket listens on while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


#: (what fails, the command, what the one line on stderr says); {path}, {port}, {dir} filled in.
STARTUP_FAILURES = [
    ("port in use", ["run", "-c", "{path}", "--port", "{port}"],
     "skyroute: cannot listen on 127.0.0.1:{port}: address already in use; stop the other "
     "process or pass --port (0 picks a free port)"),
    ("demo port in use", ["demo", "--port", "{port}"],
     "skyroute: cannot listen on 127.0.0.1:{port}: address already in use; stop the other "
     "process or pass --port (0 picks a free port)"),
    ("host not of this machine", ["run", "-c", "{path}", "--host", "192.0.2.1"],
     "skyroute: cannot listen on 192.0.2.1:0: this machine has no such address; pass --host "
     "with one of its addresses (127.0.0.1, or 0.0.0.0 for all)"),
    ("no such file", ["run", "-c", "{dir}/missing.yaml"],
     "skyroute: cannot read routing file {dir}/missing.yaml: no such file or directory; "
     "check the path"),
    ("a directory", ["run", "-c", "{dir}"],
     "skyroute: cannot read routing file {dir}: is a directory; name the routing YAML file "
     "itself"),
    ("not UTF-8", ["run", "-c", "{dir}/latin1.yaml"],
     "skyroute: {dir}/latin1.yaml:2: byte 0xe9 is not UTF-8 text; save the file as UTF-8"),
    ("bad config", ["run", "-c", "{dir}/typo.yaml"],
     "skyroute: {dir}/typo.yaml:9: upstreams[0].regoin: unknown key 'regoin'; did you mean "
     "'region'?"),
]


@pytest.mark.parametrize(("what", "command", "expected"), STARTUP_FAILURES,
                         ids=[case[0] for case in STARTUP_FAILURES])
async def test_a_startup_failure_is_one_line_and_exit_1(tmp_path, busy_port, what, command,
                                                        expected):
    """Each way skyroute fails to start prints one line saying what, where and what to do."""
    path = tmp_path / "routing.yaml"
    path.write_text(GOOD)
    (tmp_path / "latin1.yaml").write_bytes(b"# routing\n# caf\xe9\n" + GOOD.encode())
    (tmp_path / "typo.yaml").write_text(GOOD.replace("    region: x\n", "    regoin: x\n"))
    fill = {"path": str(path), "port": str(busy_port), "dir": str(tmp_path)}
    code, out, err = await _run(*[arg.format(**fill) for arg in command],
                                "--log-format", "console")
    assert code == 1 and "serving on" not in out
    [line] = err.splitlines()
    assert line.startswith(expected.format(**fill)), line


async def test_a_startup_failure_in_a_JSON_log_is_one_startup_failed_event(tmp_path, busy_port):
    """With JSON logs run's failure is a startup_failed event, so the log stays JSON."""
    path = tmp_path / "routing.yaml"
    path.write_text(GOOD)
    code, _, err = await _run("run", "-c", str(path), "--port", str(busy_port),
                              "--log-format", "json")
    assert code == 1
    [line] = err.splitlines()
    event = json.loads(line)
    assert event["event"] == "startup_failed" and event["level"] == "error"
    assert event["error"].startswith(f"cannot listen on 127.0.0.1:{busy_port}: address "
                                     "already in use")
    code, _, err = await _run("validate", str(tmp_path / "missing.yaml"), "--log-format", "json")
    assert code == 1  # validate's output is text for a person, never a log
    assert err == f"skyroute: cannot read routing file {tmp_path}/missing.yaml: no such file " \
                  "or directory; check the path\n"


async def test_a_startup_failure_shows_its_traceback_only_at_debug_level(tmp_path, busy_port):
    """--log-level debug adds the traceback above the same one line."""
    path = tmp_path / "routing.yaml"
    path.write_text(GOOD)
    code, _, err = await _run("run", "-c", str(path), "--port", str(busy_port),
                              "--log-format", "console", "--log-level", "debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "Errno 98" in err
    assert err.splitlines()[-1].startswith(f"skyroute: cannot listen on 127.0.0.1:{busy_port}")


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "-c", "f.yaml", "--port", "70000"],
     "skyroute run: argument --port: '70000' is not a port: give 0-65535 (0 picks a free one); "
     "see skyroute run --help"),
    (["run", "-c", "f.yaml", "--bogus"],
     "skyroute: unrecognized arguments: --bogus; see skyroute --help"),
    (["validate", "f.yaml", "--log-level", "loud"],
     "skyroute validate: argument --log-level: invalid choice: 'loud'"),
])
async def test_a_wrong_command_line_is_one_line_and_exit_2(args, expected):
    """A usage error is one line naming the argument and where to read more, status 2."""
    code, _, err = await _run(*args)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(expected), line


async def test_a_control_byte_in_a_header_is_one_safe_JSON_event(tmp_path):
    """aiohttp's parse error for a header with a control byte is logged as one JSON
    client_request_malformed event with the peer, without the header's value."""
    path = tmp_path / "routing.yaml"
    path.write_text(GOOD)
    proc = await _start("run", "-c", str(path), "--port", "0")
    try:
        url = (await proc.wait_line(r'"url": "(http://[^"]+)"')).group(1)
        host, port = url.removeprefix("http://").split(":")
        async with asyncio.timeout(CALL_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer sk-client-\x01SECRET\r\n\r\n")
        async with asyncio.timeout(CALL_TIMEOUT_S):
            answer = await reader.read()
        writer.close()
        assert b" 400 " in answer.split(b"\r\n", 1)[0]
        line = await proc.wait_line(r'"event": "client_request_malformed"')
        assert await proc.stop() == 0
        async with asyncio.timeout(CALL_TIMEOUT_S):
            rest = await proc.proc.stderr.read()
    finally:
        await proc.stop(signal.SIGKILL)
    event = json.loads(line.string)
    assert event["peer"] == "127.0.0.1" and event["status"] == 400
    assert event["reason"] == "Invalid header value char"
    lines = [*proc.lines, *rest.decode().splitlines()]
    assert all(isinstance(json.loads(entry), dict) for entry in lines), lines
    assert not [entry for entry in lines if "SECRET" in entry or "\\u0001" in entry]


async def test_demo_serves_the_embedded_default_without_keys():
    """skyroute demo starts stand-ins and skyroute, prints how to try it, and answers."""
    proc = await _start("demo", "--port", "0")
    try:
        url = (await proc.wait_line(r"serving on (http://\S+)", stream="stdout")).group(1)
        key = (await proc.wait_line(r"Bearer (sk-[\w-]+)", stream="stdout")).group(1)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                                      timeout=CALL_TIMEOUT_S) as client:
            reply = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content.startswith("Hello from")
            stream = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
        assert await proc.stop(signal.SIGINT) == 0
    finally:
        await proc.stop(signal.SIGKILL)


async def test_demo_prints_its_embedded_config():
    """demo --print-config shows the routing file the demo serves."""
    code, out, _ = await _run("demo", "--print-config")
    assert code == 0
    assert "routes:" in out and "local-gpu" in out


async def test_demo_with_three_instances_peers_them():
    """demo --instances 3 runs three peered skyroute instances sharing one rpm limit."""
    proc = await _start("demo", "--port", "0", "--instances", "3")
    try:
        url = (await proc.wait_line(r"serving on (http://\S+)", stream="stdout")).group(1)
        other = (await proc.wait_line(r"peered, serving on (http://\S+)", stream="stdout")
                 ).group(1)
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def peers_connected() -> bool:
                health = await (await http.get(f"{other}/health")).json()
                return bool(health["peers"]) and set(health["peers"]) == {"connected"}

            await eventually(peers_connected, timeout=10)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-skyroute-limited",
                                      max_retries=0, timeout=CALL_TIMEOUT_S) as client:
            reply = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content.startswith("Hello from")
        assert await proc.stop(signal.SIGINT) == 0
    finally:
        await proc.stop(signal.SIGKILL)


async def test_demo_prometheus_without_the_binary_says_how_to_get_one(tmp_path):
    """demo --prometheus with no prometheus on PATH names the package and the two overrides."""
    code, out, err = await _run("demo", "--port", "0", "--prometheus", "--log-format", "console",
                                env={"PATH": str(tmp_path), "SKYROUTE_PROMETHEUS_BIN": ""})
    assert code == 1 and "serving on" not in out
    [line] = err.splitlines()
    assert line.startswith("skyroute: demo --prometheus: the prometheus binary is not installed")
    assert "the prometheus binary is not installed" in err
    assert "apt-get install prometheus" in err
    assert "--prometheus-bin PATH or SKYROUTE_PROMETHEUS_BIN=PATH" in err


async def test_demo_prometheus_bin_must_name_an_executable(tmp_path):
    """--prometheus-bin naming no executable file is refused before anything starts."""
    missing = tmp_path / "prometheus"
    code, out, err = await _run("demo", "--port", "0", "--prometheus-bin", str(missing),
                                "--log-format", "console")
    assert code == 1 and "serving on" not in out
    assert f"--prometheus-bin {missing}: no executable file there" in err


async def test_demo_prometheus_that_fails_to_start_shows_its_log(tmp_path):
    """A prometheus that exits at start fails the demo in one line: its status and last log
    line, exit 1."""
    fake = tmp_path / "prometheus"
    fake.write_text("#!/bin/sh\necho 'err=\"opening storage failed: read-only file system\"'\n"
                    "exit 3\n")
    fake.chmod(0o755)
    code, out, err = await _run("demo", "--port", "0", "--prometheus-bin", str(fake),
                                "--log-format", "console")
    assert code == 1 and "serving on" not in out
    [line] = err.splitlines()
    assert f"prometheus ({fake}) exited with status 3 at start" in line
    assert "opening storage failed: read-only file system" in err
