"""The ``skyroute`` command as a user runs it: validate, run (SIGHUP, SIGTERM) and demo."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import openai

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, eventually, routing_yaml
from .conftest import upstream_yaml as entry

SKYROUTE = [sys.executable, "-m", "skyroute.proxy.cli"]
REPO = Path(__file__).resolve().parent.parent


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *SKYROUTE, *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), CALL_TIMEOUT_S * 3)
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
        return await asyncio.wait_for(self.proc.wait(), CALL_TIMEOUT_S * 3)


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
            await proc.wait_line(r'"event": "config reloaded"')
            assert sorted([m.id async for m in client.models.list()]) == ["b", "chat"]
        assert await proc.stop() == 0
    finally:
        await proc.stop(signal.SIGKILL)


async def test_run_refuses_an_invalid_file_at_start(tmp_path):
    """skyroute run with a broken file prints the problems and exits 1 without serving."""
    path = tmp_path / "routing.yaml"
    path.write_text(BROKEN)
    code, _, err = await _run("run", "--config", str(path))
    assert code == 1
    assert "unknown key 'regoin'" in err


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
    code, out, err = await _run("demo", "--port", "0", "--prometheus",
                                env={"PATH": str(tmp_path), "SKYROUTE_PROMETHEUS_BIN": ""})
    assert code == 1 and "serving on" not in out
    assert "the prometheus binary is not installed" in err
    assert "apt-get install prometheus" in err
    assert "--prometheus-bin PATH or SKYROUTE_PROMETHEUS_BIN=PATH" in err


async def test_demo_prometheus_bin_must_name_an_executable(tmp_path):
    """--prometheus-bin naming no executable file is refused before anything starts."""
    missing = tmp_path / "prometheus"
    code, out, err = await _run("demo", "--port", "0", "--prometheus-bin", str(missing))
    assert code == 1 and "serving on" not in out
    assert f"--prometheus-bin {missing}: no executable file there" in err


async def test_demo_prometheus_that_fails_to_start_shows_its_log(tmp_path):
    """A prometheus that exits at start fails the demo with its status and log, and exit 1."""
    fake = tmp_path / "prometheus"
    fake.write_text("#!/bin/sh\necho 'err=\"opening storage failed: read-only file system\"'\n"
                    "exit 3\n")
    fake.chmod(0o755)
    code, out, err = await _run("demo", "--port", "0", "--prometheus-bin", str(fake))
    assert code == 1 and "serving on" not in out
    assert f"prometheus ({fake}) exited with status 3 at start" in err
    assert "opening storage failed: read-only file system" in err
