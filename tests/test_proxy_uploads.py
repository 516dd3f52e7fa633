"""Uploads move through skyroute as streams: a 200 MB file with bounded memory.

skyroute runs as its own process (``skyroute run``), so its peak resident memory
(``VmHWM``) is its own; the stand-in and the client stream in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, routing_yaml
from .conftest import upstream_yaml as entry

UPLOAD_BYTES = 200 * 1024 * 1024
#: What the issue allows skyroute's memory to grow by while the upload passes.
MAX_GROWTH_BYTES = 32 * 1024 * 1024
CHUNK = b"\x5a" * (1 << 20)
BOUNDARY = "skyroute-upload-test"


def peak_rss(pid: int) -> int:
    """A process's peak resident set size in bytes (Linux ``VmHWM``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, "no VmHWM in /proc/<pid>/status"
    return int(match.group(1)) * 1024


def multipart(size: int, digest: hashlib._Hash) -> tuple[int, AsyncIterator[bytes]]:
    """A files.create body of ``size`` file bytes, generated as it is sent."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        for _ in range(size // len(CHUNK)):
            digest.update(CHUNK)
            yield CHUNK
        yield tail

    return len(head) + size + len(tail), chunks()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
async def test_200MB_upload_passes_with_memory_growth_under_32MB(standin, tmp_path):
    """A 200 MB multipart upload reaches the upstream whole; skyroute's peak RSS grows < 32 MB."""
    up = await standin("a")
    config = tmp_path / "routing.yaml"
    config.write_text(routing_yaml([entry(up)]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyroute.proxy.cli", "--log-format", "json", "run",
        "--config", str(config), "--port", "0", "--workers", "1",  # this pid serves
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp_path)})
    drain: asyncio.Task[bytes] | None = None
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(CALL_TIMEOUT_S * 2):
            while not (match := re.search(rb'"url": "(http://[^"]+)"',
                                          await proc.stderr.readline())):
                pass
        url = match.group(1).decode()
        drain = asyncio.create_task(proc.stderr.read())  # keep the log pipe flowing
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S * 12)
        headers = {"Authorization": f"Bearer {CLIENT_KEY}",
                   "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for size in (len(CHUNK), UPLOAD_BYTES):  # the first warms every code path
                if size == UPLOAD_BYTES:
                    before = peak_rss(proc.pid)
                digest = hashlib.sha256()
                length, body = multipart(size, digest)
                resp = await http.post(f"{url}/v1/files", data=body,
                                       headers={**headers, "Content-Length": str(length)})
                created = await resp.json()
                assert resp.status == 200, created
                assert created["bytes"] == size
                assert up.api.files[created["id"]].sha256 == digest.hexdigest()
        growth = peak_rss(proc.pid) - before
        print(f"skyroute peak RSS {before >> 20} MiB before, grew {growth >> 20} MiB")
        assert growth < MAX_GROWTH_BYTES, f"skyroute's peak RSS grew by {growth >> 20} MiB"
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await proc.wait()
        if drain is not None:
            drain.cancel()
