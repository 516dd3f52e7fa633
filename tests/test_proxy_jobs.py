"""Durable jobs through skyroute: async requests, webhooks and the Batch API with the SDK."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from skyroute.proxy import Server, load_config
from skyroute.proxy._jobs_runner import JOBS, pause, wake_within
from skyroute.proxy._jobs_webhooks import CheckedResolver, HostRefused, HostUnresolved, refusal
from skyroute.routing import JobsPolicy, LaneProcess

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

WEBHOOK_SECRET = "whsec-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
#: Generous: a loaded 2-core machine runs the suite beside other work.
DONE_TIMEOUT_S = 60.0
#: ``--grace`` of the ``skyroute run`` processes these tests start.
GRACE_S = 5.0


SHARED_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_prefixes() -> Iterator[list[str]]:
    """The key prefixes tests used in the shared Redis, deleted once every test's servers
    have stopped (jobs and batches would otherwise stay there for ``jobs.retention``)."""
    used: list[str] = []
    yield used
    for prefix in used:
        delete_prefix(SHARED_REDIS, prefix)


@pytest.fixture(params=["sqlite", "redis"])
def queue(request: pytest.FixtureRequest, redis_prefixes: list[str]) -> str | None:
    """Each test on the embedded queue and on the shared Redis (a prefix of its own)."""
    if request.param == "sqlite":
        return None
    redis_prefixes.append(f"skyroute-test:{os.urandom(6).hex()}:")
    return f"{{url: '{SHARED_REDIS}', prefix: '{redis_prefixes[-1]}'}}"


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (the test's servers are stopped by now)."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=CALL_TIMEOUT_S,
                              socket_connect_timeout=CALL_TIMEOUT_S) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start:start + 1000])


def jobs_yaml(data_dir: Path, redis: str | None = None, **overrides: Any) -> str:
    """A ``jobs`` section with test-friendly retry delays."""
    if redis is not None:
        overrides["redis"] = redis
    settings = {"data_dir": str(data_dir), "backoff_base": "0.05s", "backoff_cap": "0.2s",
                "visibility_timeout": "2s", "webhook_secret": WEBHOOK_SECRET,
                "webhook_hosts": "[127.0.0.1]", **overrides}
    return "jobs:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items())


def chat_line(i: int, *, endpoint: str = "/v1/chat/completions") -> dict[str, Any]:
    """Batch line ``i``: its prompt has i % 9 + 1 words, which the stand-in counts back."""
    words = " ".join(["w"] * (i % 9 + 1))
    return {"custom_id": f"req-{i}", "method": "POST", "url": endpoint,
            "body": {"model": "chat", "messages": [{"role": "user", "content": words}]}}


def jsonl(items: list[Any]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


async def start_batch(client: openai.AsyncOpenAI, lines: int | bytes) -> Any:
    """Upload ``lines`` (JSONL, or that many ``chat_line``s) with purpose batch and create a
    /v1/chat/completions batch of it, as every batch test does; the batch as created."""
    content = jsonl([chat_line(i) for i in range(lines)]) if isinstance(lines, int) else lines
    uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(content)),
                                         purpose="batch")
    return await client.batches.create(input_file_id=uploaded.id,
                                       endpoint="/v1/chat/completions", completion_window="24h")


async def wait_batch(client: openai.AsyncOpenAI, batch_id: str, *statuses: str) -> Any:
    """Poll until the batch reaches one of ``statuses``."""
    seen: list[Any] = []

    async def reached() -> bool:
        seen.append(await client.batches.retrieve(batch_id))
        return seen[-1].status in statuses

    await eventually(reached, timeout=DONE_TIMEOUT_S, interval=0.1)
    return seen[-1]


async def read_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[[Server], openai.AsyncOpenAI]]:
    """Factory: the SDK pointed at a skyroute, closed after the test."""
    made: list[openai.AsyncOpenAI] = []

    def make(server: Server) -> openai.AsyncOpenAI:
        made.append(client_for(server))
        return made[-1]

    yield make
    for client in made:
        await client.close()


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A server on port 0 keeping every webhook delivery it gets (headers, body)."""
    got: list[tuple[dict[str, str], bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/hook", got
    await runner.cleanup()


def verify_signature(headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks' check, as a receiver writes it."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(WEBHOOK_SECRET.encode(), signed,
                                         hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, sig.partition(",")[2])
               for sig in headers["webhook-signature"].split())


async def test_async_request_with_idempotency_key_and_signed_webhook(
        standin, skyroute, tmp_path, webhook_receiver, queue):
    """A repeated submit with one Idempotency-Key makes one job; its answer and a signed webhook
    arrive; the same key with another body is refused with 409."""
    up = await standin("a")
    hook_url, deliveries = webhook_receiver
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data", queue)))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi there"}]}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    headers = {**AUTH, "Idempotency-Key": "order-42", "X-Webhook-URL": hook_url}
    async with aiohttp.ClientSession(timeout=timeout) as http:
        answers = []
        for _ in range(2):
            async with http.post(f"{server.url}/v1/async/chat/completions", json=body,
                                 headers=headers) as resp:
                assert resp.status == 202
                answers.append(await resp.json())
        assert answers[0]["id"] == answers[1]["id"]
        assert answers[0]["status"] == "queued"
        status_url = answers[0]["status_url"]
        assert status_url == f"{server.url}/v1/async/jobs/{answers[0]['id']}"

        async def done() -> bool:
            async with http.get(status_url, headers=AUTH) as resp:
                answers.append(await resp.json())
            return answers[-1]["status"] == "completed"

        await eventually(done, timeout=DONE_TIMEOUT_S)
        job = answers[-1]
        assert job["response"]["status_code"] == 200
        assert job["response"]["body"]["choices"][0]["message"]["content"].startswith(
            "Hello from a")
        async with http.post(f"{server.url}/v1/async/chat/completions",
                             json={**body, "seed": 1}, headers=headers) as resp:
            assert resp.status == 409
            assert "Idempotency-Key" in (await resp.json())["error"]["message"]
        async with http.get(status_url, headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
    await eventually(lambda: len(deliveries) >= 1, timeout=DONE_TIMEOUT_S)
    hook_headers, hook_body = deliveries[0]
    assert verify_signature(hook_headers, hook_body)
    assert not verify_signature({**hook_headers, "webhook-timestamp": "1"}, hook_body)
    delivered = json.loads(hook_body)
    assert delivered["id"] == job["id"] and delivered["status"] == "completed"
    assert up.requests_total == 1  # one job, one upstream call


async def test_a_client_request_cannot_pose_as_a_job_call(standin, skyroute, tmp_path):
    """A job's call is a request the runner builds in-process: a client sending what job
    calls once carried (a token, the submitting key's name) is still a client, refused
    without a key of its own and served as itself with one."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data")))
    posing = {"X-Skyroute-Job-Token": "0" * 64, "X-Skyroute-Job-Client": "tests"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        async with http.post(f"{server.url}/v1/chat/completions", json=body,
                             headers=posing) as resp:
            assert resp.status == 401
        async with http.post(f"{server.url}/v1/chat/completions", json=body,
                             headers={**posing, **AUTH}) as resp:
            assert resp.status == 200
        async with http.get(f"{server.url}/metrics") as resp:
            metrics = await resp.text()
    assert up.requests_total == 1
    assert 'skyroute_jobs_finished_total{kind="async"' not in metrics  # no job ran
    assert not (tmp_path / "data" / "job-token").exists()  # no secret to guess or leak


async def test_async_request_cancel_and_unknown_model(standin, skyroute, tmp_path, queue):
    """DELETE cancels a queued job; a model no route serves is refused at submit (404), and so
    is an async request for an async path (400)."""
    up = await standin("a")
    up.behaviour.mode = "error"
    up.behaviour.error_status = 503
    up.behaviour.retry_after_s = 30
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data", queue)))
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(f"{server.url}/v1/async/chat/completions", json=body,
                             headers=AUTH) as resp:
            job = await resp.json()
        await up.wait_for(lambda u: u.requests_total >= 1, timeout=DONE_TIMEOUT_S)
        async with http.delete(job["status_url"], headers=AUTH) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "cancelled"
        async with http.post(f"{server.url}/v1/async/chat/completions",
                             json={**body, "model": "nope"}, headers=AUTH) as resp:
            assert resp.status == 404
            assert "nope" in (await resp.json())["error"]["message"]
        async with http.post(f"{server.url}/v1/async/async/chat/completions", json=body,
                             headers=AUTH) as resp:
            assert resp.status == 400
            assert "/v1/chat/completions" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(("hosts", "url", "says"), [
    ("[]", "http://127.0.0.1:9/hook", "jobs.webhook_hosts"),  # the default: webhooks off
    ("['*']", "http://127.0.0.1:9/hook", "jobs.webhook_hosts"),  # '*': public hosts only
    ("[hooks.example.com]", "http://127.0.0.1:9/hook", "'127.0.0.1' is not allowed"),
    # an allowed name that resolves to loopback (a rebinding attacker's trick) is refused
    ("[localhost]", "http://localhost:9/hook", "a private, loopback or link-local address"),
    ("[127.0.0.1]", "http://169.254.169.254/latest/meta-data", "'169.254.169.254'"),
    ("[127.0.0.1]", "file:///etc/passwd", "not an http(s) URL"),
])
async def test_webhook_targets_outside_webhook_hosts_are_refused(standin, skyroute, tmp_path,
                                                                 hosts, url, says):
    """A stranger cannot make skyroute call internal addresses: a webhook URL must be allowed
    by jobs.webhook_hosts, and private/loopback/link-local addresses need an IP entry."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", webhook_hosts=hosts)))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with (aiohttp.ClientSession(timeout=timeout) as http,
                http.post(f"{server.url}/v1/async/chat/completions", json=body,
                          headers={**AUTH, "X-Webhook-URL": url}) as resp):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert says in error["message"]
    assert "jobs.webhook_hosts" in error["message"] or "http(s)" in error["message"]
    assert error["param"] == "X-Webhook-URL"
    assert up.requests_total == 0  # nothing was queued


async def test_delivery_resolver_refuses_a_name_rebound_to_loopback():
    """At delivery the session resolves through CheckedResolver: the addresses it checks are
    the ones connected to, so a name that now resolves to loopback is not called."""
    refusing = CheckedResolver(lambda: JobsPolicy(webhook_hosts=("localhost",)))
    allowing = CheckedResolver(lambda: JobsPolicy(webhook_hosts=("localhost", "127.0.0.0/8")))
    try:
        with pytest.raises(OSError, match=r"resolves to 127\.0\.0\.1"):
            await refusing.resolve("localhost", 80, socket.AF_INET)
        resolved = await allowing.resolve("localhost", 80, socket.AF_INET)
        assert [r["host"] for r in resolved] == ["127.0.0.1"]
    finally:
        await refusing.close()
        await allowing.close()


class FailingDns(aiohttp.abc.AbstractResolver):
    """A stand-in resolver answering every lookup with one getaddrinfo error (no network)."""

    def __init__(self, errno: int) -> None:
        self.errno = errno

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        raise socket.gaierror(self.errno, "stand-in DNS failure")

    async def close(self) -> None:
        pass


async def test_delivery_to_a_host_that_no_longer_resolves_is_refused_not_retried():
    """At delivery, no such name is a refusal (unresolved); a resolver that did not answer
    (EAI_AGAIN) is an ordinary failure, retried with backoff."""
    policy = JobsPolicy(webhook_hosts=("hooks.example.test",))
    gone = CheckedResolver(lambda: policy, resolver=FailingDns(socket.EAI_NONAME))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=gone)) as http:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await http.post("http://hooks.example.test/hook", timeout=aiohttp.ClientTimeout(
                total=CALL_TIMEOUT_S))
    refused = refusal(caught.value)
    assert isinstance(refused, HostUnresolved) and refused.result == "unresolved"
    assert "'hooks.example.test' does not resolve" in str(refused)
    slow = CheckedResolver(lambda: policy, resolver=FailingDns(socket.EAI_AGAIN))
    with pytest.raises(socket.gaierror):
        await slow.resolve("hooks.example.test")
    assert refusal(socket.gaierror(socket.EAI_AGAIN, "again")) is None
    with pytest.raises(HostRefused):
        await CheckedResolver(lambda: JobsPolicy(webhook_hosts=("localhost",))).resolve(
            "localhost")


async def test_webhook_host_no_longer_allowed_at_delivery_is_refused_once(
        standin, skyroute, tmp_path, webhook_receiver, captured_logs):
    """A webhook accepted at submit whose host's address a reload stopped allowing is refused
    at delivery: not sent, not retried, logged and counted as refused."""
    up = await standin("a")
    up.behaviour.mode = "error"  # holds the job in retries until the reload is served
    up.behaviour.retry_after_s = 0
    hook_url, deliveries = webhook_receiver
    hook_url = hook_url.replace("127.0.0.1", "localhost")
    allowed = "[localhost, 127.0.0.0/8, '::1']"
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", webhook_hosts=allowed, max_retries=100)))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        async with http.post(f"{server.url}/v1/async/chat/completions", json=body,
                             headers={**AUTH, "X-Webhook-URL": hook_url}) as resp:
            assert resp.status == 202, await resp.text()
        assert server.config_path is not None
        server.config_path.write_text(routing_yaml([entry(up)], extra=jobs_yaml(
            tmp_path / "data", webhook_hosts="[localhost]", max_retries=100)))
        await eventually(lambda: server.app[JOBS].policy.webhook_hosts == ("localhost",),
                         timeout=DONE_TIMEOUT_S)
        up.behaviour.mode = "ok"

        async def counted() -> bool:
            async with http.get(f"{server.url}/metrics") as resp:
                return 'skyroute_jobs_webhooks_total{result="refused"} 1.0' in await resp.text()

        await eventually(counted, timeout=DONE_TIMEOUT_S)
        async with http.get(f"{server.url}/metrics") as resp:
            metrics = await resp.text()
    assert deliveries == []
    assert 'skyroute_jobs_webhooks_total{result="retry"}' not in metrics
    refused = [e for e in captured_logs if e["event"] == "job_webhook_refused"]
    assert len(refused) == 1 and refused[0]["result"] == "refused"
    assert "resolves to" in refused[0]["error"] and "jobs.webhook_hosts" in refused[0]["error"]


@pytest.mark.parametrize("sent", [
    b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n',  # between parts
    b'--xx\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
    b"Content-Type: application/jsonl\r\n\r\n" + jsonl([chat_line(0)]),  # inside the file
], ids=["between-parts", "inside-file"])
async def test_local_file_upload_paused_too_long_gets_408(standin, skyroute, tmp_path, sent):
    """A slow-loris upload to the local Files API gets limits.body_timeout's 408, as a
    pass-through upload does, and leaves no partial file behind."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra="limits:\n  body_timeout: 200ms\n"
                                         + jobs_yaml(tmp_path / "data")))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
                     b"Content-Type: multipart/form-data; boundary=xx\r\n"
                     b"Content-Length: 100000\r\n\r\n" + sent)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            data = await reader.read()  # until the server closes
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "request_timeout"' in data and b"limits.body_timeout" in data
    assert not [p for p in (tmp_path / "data").rglob("*") if p.name.endswith(".upload")]


@pytest.mark.parametrize(("method", "path", "kwargs", "says"), [
    ("POST", "/v1/async/chat/completions", {"headers": {"Content-Type": "application/json"}},
     "needs the JSON body"),
    ("POST", "/v1/async/chat/compl%C3%A9tions", {"json": {"model": "chat"}},
     "is not an OpenAI API path"),
    ("GET", "/v1/async/jobs/job%20x", {}, "is not a job id"),
    ("GET", "/v1/files/file%C2%84", {}, "is not a file id"),
    ("POST", "/v1/batches/b%2Ex/cancel", {}, "is not a batch id"),
    ("GET", "/v1/batches?limit=101", {}, "limit must be a whole number from 1 to 100"),
    ("POST", "/v1/files", {"data": b"", "headers": {"Content-Type": "multipart/form-data"}},
     "not valid multipart"),
    ("POST", "/v1/files", {"data": {"purpose": "batch", "colour": "red"}}, "unknown form field"),
], ids=["async-no-body", "async-path", "job-id", "file-id", "batch-id", "batches-limit",
        "no-boundary", "unknown-field"])
async def test_job_api_refuses_malformed_requests_with_400(standin, skyroute, tmp_path, method,
                                                           path, kwargs, says):
    """What the OpenAPI description (proxy/openapi.yaml) does not allow is a 400 saying what
    was wrong, not a 500, a clamp or a job that can only fail."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data")))
    if isinstance(kwargs.get("data"), dict):
        form = aiohttp.FormData(kwargs["data"])
        form.add_field("file", b"{}\n", filename="in.jsonl")
        kwargs = {"data": form}
    kwargs.setdefault("headers", {})
    kwargs["headers"] = {**kwargs["headers"], **AUTH}
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http,
                http.request(method, server.url + path, **kwargs) as resp):
        assert resp.status == 400, await resp.text()
        assert says in (await resp.json())["error"]["message"]
    assert up.requests_total == 0


async def test_local_file_upload_over_max_upload_bytes_gets_413(standin, skyroute, tmp_path, sdk):
    """limits.max_upload_bytes bounds local uploads (413), by Content-Length or as they arrive."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra="limits:\n  max_upload_bytes: 1000\n"
                                         + jobs_yaml(tmp_path / "data")))
    client = sdk(server)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.files.create(file=("in.jsonl", jsonl([chat_line(i) for i in range(30)])),
                                  purpose="batch")
    assert caught.value.status_code == 413
    assert "limits.max_upload_bytes" in caught.value.message


async def test_files_and_batches_lists_page_with_the_sdks_auto_pagination(
        standin, skyroute, tmp_path, sdk, queue):
    """files.list and batches.list honour after/limit with has_more/first_id/last_id, so the
    SDK's auto-pagination walks every item once, newest first."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data", queue)))
    client = sdk(server)
    files = [await client.files.create(file=(f"in{i}.jsonl", jsonl([chat_line(i)])),
                                       purpose="batch") for i in range(5)]
    page = await client.files.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    assert page.model_extra is not None and page.model_extra["last_id"] == page.data[-1].id
    walked = [f.id async for f in client.files.list(limit=2)]
    assert sorted(walked) == sorted(f.id for f in files) and len(set(walked)) == 5
    oldest_first = [f.id async for f in client.files.list(limit=3, order="asc")]
    assert oldest_first == walked[::-1]
    last = await client.files.list(after=walked[3], limit=2)
    assert [f.id for f in last.data] == walked[4:] and not last.has_more
    batches = [await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window="24h") for f in files[:3]]
    walked_batches = [b.id async for b in client.batches.list(limit=1)]
    assert sorted(walked_batches) == sorted(b.id for b in batches)
    for batch in batches:
        await wait_batch(client, batch.id, "completed")
    outputs = [f.id async for f in client.files.list(purpose="batch_output", limit=2)]
    assert len(outputs) == 3 and all(i.endswith("-output") for i in outputs)
    inputs = [f.id async for f in client.files.list(purpose="batch", limit=2)]
    assert inputs == walked  # the purpose filter pages over the owner's files in order
    assert [f.id for f in (await client.files.list(limit=2, after="file-nope")).data] == []


async def test_500_line_batch_completes_with_every_answer(standin, skyroute, tmp_path, sdk, queue):
    """A 500-line batch through the SDK: completed, one output line per custom_id, each the
    answer to its own request."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data", queue)))
    client = sdk(server)
    uploaded = await client.files.create(
        file=("input.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(500)]))),
        purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = await client.batches.create(input_file_id=uploaded.id,
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"run": "t"})
    assert batch.status == "validating"
    done = await wait_batch(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    assert done.request_counts.total == 500 and done.request_counts.completed == 500
    assert done.error_file_id is None
    lines = await read_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(500))
    for line in lines:
        i = int(line["custom_id"].removeprefix("req-"))
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["usage"]["prompt_tokens"] == i % 9 + 1
    listed = await client.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    assert any(f.id == uploaded.id for f in (await client.files.list()).data)


async def test_batch_bad_lines_go_to_the_error_file_and_a_bad_file_fails(
        standin, skyroute, tmp_path, sdk, queue):
    """Bad lines are answered in the error file and the rest run; a file with no valid line
    (or a custom_id twice) fails the batch with OpenAI's errors list."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data", queue)))
    client = sdk(server)
    mixed = jsonl([chat_line(0), chat_line(1, endpoint="/v1/embeddings"), chat_line(2)])
    mixed += b"{not json\n" + jsonl([{"method": "POST"}, {**chat_line(3), "body": "text"}])
    mixed_batch = await start_batch(client, mixed)
    done = await wait_batch(client, mixed_batch.id, "completed", "failed")
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (6, 2, 4)
    assert {line["custom_id"] for line in await read_lines(client, done.output_file_id)} == \
        {"req-0", "req-2"}
    errors = await read_lines(client, done.error_file_id)
    codes = sorted(line["error"]["code"] for line in errors)
    assert codes == ["invalid_json_line", "invalid_request", "mismatched_endpoint",
                     "missing_required_parameter"]
    assert all(line["response"] is None for line in errors)

    batch = await start_batch(client, b"nope\n{]\n")
    failed = await wait_batch(client, batch.id, "failed", "completed")
    assert failed.status == "failed"
    assert [e.line for e in failed.errors.data] == [1, 2]
    assert failed.errors.data[0].code == "invalid_json_line"

    batch = await start_batch(client, jsonl([chat_line(0), chat_line(0)]))
    failed = await wait_batch(client, batch.id, "failed", "completed")
    assert failed.errors.data[0].code == "duplicate_custom_id"
    assert failed.errors.data[0].line == 2

    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await client.batches.create(input_file_id=mixed_batch.input_file_id,
                                    endpoint="/v1/chat/completions",
                                    completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")


async def test_batch_cancel_stops_the_lines_not_yet_run(standin, skyroute, tmp_path, sdk, queue):
    """Cancelling a batch whose upstream is busy: cancelling, then cancelled, with the lines
    not run in the error file as batch_cancelled."""
    up = await standin("a")
    up.behaviour.mode = "error"
    up.behaviour.retry_after_s = 30
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", queue, concurrency=2)))
    client = sdk(server)
    batch = await start_batch(client, 20)
    await wait_batch(client, batch.id, "in_progress")
    await up.wait_for(lambda u: u.requests_total >= 1, timeout=DONE_TIMEOUT_S)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await wait_batch(client, batch.id, "cancelled")
    assert done.cancelled_at is not None and done.output_file_id is None
    errors = await read_lines(client, done.error_file_id)
    assert len(errors) == 20
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    with pytest.raises(openai.APIStatusError) as refused:
        await client.batches.cancel(batch.id)
    assert refused.value.status_code == 409


async def submit_and_wait(http: aiohttp.ClientSession, server: Server,
                          body: dict[str, Any]) -> dict[str, Any]:
    """One async request, polled until it ends; its job record."""
    async with http.post(f"{server.url}/v1/async/chat/completions", json=body,
                         headers=AUTH) as resp:
        assert resp.status == 202
        status_url = (await resp.json())["status_url"]
    seen: list[dict[str, Any]] = []

    async def ended() -> bool:
        async with http.get(status_url, headers=AUTH) as resp:
            seen.append(await resp.json())
        return seen[-1]["status"] in ("completed", "failed")

    await eventually(ended, timeout=DONE_TIMEOUT_S)
    return seen[-1]


async def test_jobs_go_to_jobs_targets_and_interactive_traffic_does_not(
        standin, skyroute, tmp_path, sdk, captured_logs):
    """jobs.targets sends a route's jobs to the local pool first while interactive requests
    keep the route's targets; with the pool failing, jobs fall back to the route's targets."""
    cloud, gpu = await standin("cloud"), await standin("gpu")
    server = await skyroute(routing_yaml(
        [entry(cloud), entry(gpu)], "- model: chat\n  targets: [cloud]\n",
        extra=jobs_yaml(tmp_path / "data", targets="{chat: [gpu]}")))
    client = sdk(server)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        await client.chat.completions.create(model="chat", messages=body["messages"])
    assert (cloud.requests_total, gpu.requests_total) == (3, 0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        for _ in range(3):
            job = await submit_and_wait(http, server, body)
            assert job["status"] == "completed"
            assert job["response"]["body"]["choices"][0]["message"]["content"].startswith(
                "Hello from gpu")
        assert (cloud.requests_total, gpu.requests_total) == (3, 3)
        gpu.behaviour.mode = "error"
        gpu.behaviour.error_status = 503
        job = await submit_and_wait(http, server, body)
        assert job["status"] == "completed"
        assert job["response"]["body"]["choices"][0]["message"]["content"].startswith(
            "Hello from cloud")
        async with http.get(f"{server.url}/metrics") as resp:
            metrics = await resp.text()
        async with http.get(f"{server.url}/health") as resp:
            assert (await resp.json())["jobs"]["targets"] == {"chat": ["gpu"]}
    assert 'skyroute_jobs_targets_total{choice="preferred",route="chat"} 3.0' in metrics
    assert 'skyroute_jobs_targets_total{choice="fallback",route="chat"} 1.0' in metrics
    fallbacks = [e for e in captured_logs if e["event"] == "job_target_fallback"]
    assert [(e["upstream"], e["preferred"]) for e in fallbacks] == [("cloud", ["gpu"])]
    assert fallbacks[0]["request_id"] == job["id"]


async def lane(http: aiohttp.ClientSession, server: Server) -> dict[str, Any]:
    async with http.get(f"{server.url}/health") as resp:
        return (await resp.json())["jobs"]["lane"]


async def test_503_burst_makes_the_lane_back_off_then_the_batch_finishes(
        standin, skyroute, tmp_path, sdk):
    """While the only upstream answers 503 the lane's window drops to 1 and lines wait in
    backoff; once it recovers every line completes and the window grows again."""
    up = await standin("a")
    up.behaviour.mode = "error"
    up.behaviour.error_status = 503
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", concurrency=8, max_retries=100)))
    client = sdk(server)
    batch = await start_batch(client, 60)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        assert (await lane(http, server))["limit"] == 8

        async def backed_off() -> bool:
            return (await lane(http, server))["window"] == 1

        await eventually(backed_off, timeout=DONE_TIMEOUT_S)
        assert (await client.batches.retrieve(batch.id)).request_counts.completed == 0
        up.behaviour.mode = "ok"
        done = await wait_batch(client, batch.id, "completed", "failed")
        assert done.status == "completed"
        assert done.request_counts.completed == 60
        assert (await lane(http, server))["window"] > 1
        async with http.get(f"{server.url}/metrics") as resp:
            metrics = await resp.text()
    assert 'skyroute_jobs_lane_slowdowns_total{reason="busy"}' in metrics
    assert 'skyroute_jobs_finished_total{kind="line",result="completed"} 60.0' in metrics
    # Every try was claimed, by the lane or as the refill of a try that ended: most of
    # them the latter (a window of 1 runs one try after another).
    claimed = {how: float(n) for how, n in re.findall(
        r'^skyroute_jobs_claimed_total\{how="(\w+)"\} (\S+)$', metrics, re.MULTILINE)}
    assert claimed.keys() == {"claim", "refill"}
    assert sum(claimed.values()) >= 60


async def test_lane_yields_to_clients_and_gets_its_window_back(standin, skyroute, tmp_path,
                                                                sdk):
    """While client requests are served the lane starts jobs only within its share (from 0,
    growing while the CPU allows); with no clients it has its whole window again, and the
    batch completes either way."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.1
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", concurrency=8)))
    client = sdk(server)
    f = await client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(40)]))), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        async def metric(name: str) -> float:
            async with http.get(f"{server.url}/metrics") as resp:
                text = await resp.text()
            match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
            return float(match.group(1)) if match else 0.0

        async def yielded() -> bool:
            async with http.post(f"{server.url}/v1/chat/completions", json=body,
                                 headers=AUTH) as resp:
                assert resp.status == 200
            return await metric("skyroute_jobs_lane_yields_total") >= 1

        await eventually(yielded, timeout=DONE_TIMEOUT_S)

        async def whole_window() -> bool:
            state = await lane(http, server)
            return state["share"] == state["window"]

        await eventually(whole_window, timeout=DONE_TIMEOUT_S)
        done = await wait_batch(client, batch.id, "completed", "failed")  # clients too
        assert done.status == "completed" and done.request_counts.completed == 40

        async def gauge_whole() -> bool:  # /metrics and /health are not client requests
            return await metric("skyroute_jobs_lane_share") == (await lane(http, server))[
                "window"]

        await eventually(gauge_whole, timeout=DONE_TIMEOUT_S)


async def start_skyroute(config: Path, tmp_path: Path, *, started: list[dict[str, Any]] | None
                         = None) -> tuple[asyncio.subprocess.Process, str, asyncio.Task[bytes]]:
    """``skyroute run --workers 1`` in a session of its own: with ``jobs.lane.process``
    ``separate`` (``auto`` with Redis) a supervisor, one serving worker and the jobs worker,
    with ``inline`` (``auto`` with SQLite) one process. Its URL once every worker listens;
    ``started`` gets the ``workers_started`` (or ``server_started``) event."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyroute.proxy.cli", "--log-format", "json", "run",
        "--config", str(config), "--port", "0", "--workers", "1",
        # Shutdown is not what these tests check: a short grace keeps stop() well within its
        # bound on a loaded machine (the default, 30 s, equals that bound).
        "--grace", str(GRACE_S),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)}, start_new_session=True)
    assert proc.stderr is not None
    policy = load_config(config).jobs
    separate = policy is not None and policy.lane_process is LaneProcess.SEPARATE
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S * 3):
            while True:
                line = await proc.stderr.readline()
                assert line, "skyroute exited before it listened"
                event = json.loads(line)
                if event["event"] == ("workers_started" if separate else "server_started"):
                    break
    except BaseException:  # nothing it started outlives the test, nor its pipe
        with contextlib.suppress(ProcessLookupError):
            kill_9(proc)
        await stop(proc, asyncio.ensure_future(proc.stderr.read()))
        raise
    if started is not None:
        started.append(event)
    return proc, event["url"], asyncio.create_task(proc.stderr.read())


def kill_9(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL to skyroute and every process it started (as when its machine dies)."""
    os.killpg(proc.pid, signal.SIGKILL)


async def stop(proc: asyncio.subprocess.Process, drain: asyncio.Task[bytes]) -> None:
    if proc.returncode is None:
        proc.terminate()
    async with asyncio.timeout(CALL_TIMEOUT_S * 3):
        await proc.wait()
    await drain


async def test_kill_9_mid_batch_then_restart_answers_every_custom_id_once(standin, tmp_path):
    """skyroute is killed with SIGKILL while 1,000 batch lines are in flight; a new process on
    the same data_dir finishes the batch, every custom_id in the output exactly once."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.01
    config = tmp_path / "routing.yaml"
    config.write_text(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", concurrency=16, visibility_timeout="1s")))
    proc, url, drain = await start_skyroute(config, tmp_path)
    try:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0,
                                      timeout=CALL_TIMEOUT_S) as client:
            batch = await start_batch(client, 1000)
            await up.wait_for(lambda u: u.requests_total >= 100, timeout=DONE_TIMEOUT_S)
        kill_9(proc)
        await stop(proc, drain)
        assert proc.returncode == -signal.SIGKILL
        called_before = up.requests_total
        assert called_before < 1000, "the batch finished before the kill; nothing was tested"
        proc, url, drain = await start_skyroute(config, tmp_path)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0,
                                      timeout=CALL_TIMEOUT_S) as client:
            done = await wait_batch(client, batch.id, "completed", "failed")
            assert done.status == "completed"
            assert done.request_counts.completed == 1000
            lines = await read_lines(client, done.output_file_id)
    finally:
        await stop(proc, drain)
    ids = Counter(line["custom_id"] for line in lines)
    assert len(lines) == 1000 and set(ids.values()) == {1}
    assert set(ids) == {f"req-{i}" for i in range(1000)}
    assert all(line["response"]["body"]["usage"]["prompt_tokens"] ==
               int(line["custom_id"][4:]) % 9 + 1 for line in lines)
    assert up.requests_total >= 1000  # lines in flight at the kill ran again


async def test_kill_9_right_after_the_202s_loses_no_accepted_async_job(standin, tmp_path):
    """Async submits arrive together (group commits on the event loop's connection); skyroute
    is killed with SIGKILL the moment the last 202 is read; after a restart every job id it
    answered with is there."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.5  # the jobs are still queued or running at the kill
    config = tmp_path / "routing.yaml"
    config.write_text(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data")))
    proc, url, drain = await start_skyroute(config, tmp_path)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    accepted: list[str] = []
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
            async def submit(n: int) -> None:
                for _ in range(n):
                    async with http.post(f"{url}/v1/async/chat/completions", json=body,
                                         headers=AUTH) as resp:
                        assert resp.status == 202
                        accepted.append((await resp.json())["id"])

            await asyncio.gather(*(submit(10) for _ in range(30)))
        kill_9(proc)
        await stop(proc, drain)
        assert proc.returncode == -signal.SIGKILL
        proc, url, drain = await start_skyroute(config, tmp_path)
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
            for job_id in accepted:
                async with http.get(f"{url}/v1/async/jobs/{job_id}", headers=AUTH) as resp:
                    assert resp.status == 200, job_id
    finally:
        await stop(proc, drain)
    assert len(set(accepted)) == 300


async def test_the_jobs_worker_runs_the_lane_at_idle_priority_and_is_restarted_if_killed(
        standin, tmp_path, queue):
    """``skyroute run`` with ``jobs.lane.process: separate`` (``auto`` with Redis) runs the
    lane in a worker of its own in the kernel's idle class, the serving worker at normal priority;
    a batch submitted to the public port runs there, and when that worker is killed the
    supervisor starts it again and the batch still completes, every custom_id once. Few
    lines: in the idle class the jobs worker gets next to no CPU on a saturated machine
    (a CI runner beside stress-ng), by design."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.05
    config = tmp_path / "routing.yaml"
    config.write_text(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", queue, concurrency=4, visibility_timeout="1s",
        lane="{process: separate}")))
    started: list[dict[str, Any]] = []
    proc, url, drain = await start_skyroute(config, tmp_path, started=started)
    try:
        jobs_pid = started[0]["jobs_pid"]
        (serving_pid,) = set(started[0]["pids"]) - {jobs_pid}
        assert os.sched_getscheduler(jobs_pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(serving_pid) == os.SCHED_OTHER
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0,
                                      timeout=CALL_TIMEOUT_S) as client:
            batch = await start_batch(client, 40)
            await up.wait_for(lambda u: u.requests_total >= 4, timeout=DONE_TIMEOUT_S)
            os.kill(jobs_pid, signal.SIGKILL)
            called_before = up.requests_total
            done = await wait_batch(client, batch.id, "completed", "failed")
            assert done.status == "completed" and done.request_counts.completed == 40
            lines = await read_lines(client, done.output_file_id)
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
            async with http.get(f"{url}/health") as resp:
                assert (await resp.json())["jobs"]["lane"]["process"] == "separate"

            async def counted() -> bool:  # the restarted jobs worker's counts, from /metrics
                async with http.get(f"{url}/metrics") as resp:
                    text = await resp.text()
                found = re.search(r'^skyroute_jobs_finished_total\{kind="line",'
                                  r'result="completed"\} (\S+)$', text, re.MULTILINE)
                return found is not None and float(found.group(1)) >= 40 - called_before

            await eventually(counted, timeout=DONE_TIMEOUT_S)
    finally:
        await stop(proc, drain)
    ids = Counter(line["custom_id"] for line in lines)
    assert set(ids) == {f"req-{i}" for i in range(40)} and set(ids.values()) == {1}
    events = [json.loads(line) for line in (await drain).splitlines() if line.startswith(b"{")]
    restarted = [e for e in events if e["event"] == "worker_started" and e["role"] == "jobs"]
    assert len(restarted) == 1 and restarted[0]["pid"] != jobs_pid  # after the first
    assert any(e["event"] == "worker_exited" and e["pid"] == jobs_pid for e in events)


async def test_lane_process_inline_runs_one_process(standin, tmp_path):
    """``jobs.lane.process: inline``: ``skyroute run --workers 1`` stays one process, whose
    lane runs the jobs it accepts."""
    up = await standin("a")
    config = tmp_path / "routing.yaml"
    config.write_text(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", lane="{process: inline}")))
    started: list[dict[str, Any]] = []
    proc, url, drain = await start_skyroute(config, tmp_path, started=started)
    try:
        assert "url" in started[0]  # this process listens: no supervisor, no worker
        assert Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split() == []
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0,
                                      timeout=CALL_TIMEOUT_S) as client:
            batch = await start_batch(client, 20)
            done = await wait_batch(client, batch.id, "completed", "failed")
        assert done.status == "completed" and done.request_counts.completed == 20
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http, \
                http.get(f"{url}/health") as resp:
            assert (await resp.json())["jobs"]["lane"]["process"] == "inline"
    finally:
        await stop(proc, drain)


class OwnRedis:
    """A redis-server of the test's own with AOF (fsync on every write) on a free port."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL)

        async def answers() -> bool:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.write(b"PING\r\n")
            async with asyncio.timeout(CALL_TIMEOUT_S):
                reply = await reader.readline()
            writer.close()
            await writer.wait_closed()
            return reply == b"+PONG\r\n"

        await eventually(answers, timeout=CALL_TIMEOUT_S)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=CALL_TIMEOUT_S)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_kill_9_with_redis_a_second_instance_finishes_the_batch(standin, tmp_path,
                                                                      own_redis):
    """Two instances share a Redis queue; one is killed with SIGKILL mid-batch; the other claims
    its lines after the visibility timeout and the output has every custom_id once. The lanes
    run inline: 1,000 lines in the idle class of a jobs worker would wait for idle CPU that a
    saturated CI machine does not have (the jobs worker test above covers that process)."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.01
    config = tmp_path / "routing.yaml"
    config.write_text(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", f"{{url: '{own_redis.url}'}}", concurrency=8,
        visibility_timeout="1s", lane="{process: inline}")))
    first, url, first_drain = await start_skyroute(config, tmp_path)
    second, second_url, second_drain = await start_skyroute(config, tmp_path)
    try:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0,
                                      timeout=CALL_TIMEOUT_S) as client:
            batch = await start_batch(client, 1000)
            await up.wait_for(lambda u: u.requests_total >= 100, timeout=DONE_TIMEOUT_S)
        kill_9(first)
        await stop(first, first_drain)
        assert up.requests_total < 1000, "the batch finished before the kill; nothing was tested"
        async with openai.AsyncOpenAI(base_url=f"{second_url}/v1", api_key=CLIENT_KEY,
                                      max_retries=0, timeout=CALL_TIMEOUT_S) as client:
            done = await wait_batch(client, batch.id, "completed", "failed")
            assert done.status == "completed"
            assert done.request_counts.completed == 1000
            lines = await read_lines(client, done.output_file_id)
    finally:
        await stop(second, second_drain)
        await stop(first, first_drain)
    ids = Counter(line["custom_id"] for line in lines)
    assert len(lines) == 1000 and set(ids.values()) == {1}
    assert set(ids) == {f"req-{i}" for i in range(1000)}


async def test_redis_restart_loses_no_accepted_job(standin, skyroute, tmp_path, own_redis):
    """Async jobs accepted before Redis is killed and restarted (AOF) all complete afterwards."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.05
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(
        tmp_path / "data", f"{{url: '{own_redis.url}'}}", concurrency=4,
        visibility_timeout="1s")))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        ids = []
        for _ in range(40):
            async with http.post(f"{server.url}/v1/async/chat/completions", json=body,
                                 headers=AUTH) as resp:
                assert resp.status == 202
                ids.append((await resp.json())["id"])
        await up.wait_for(lambda u: u.requests_total >= 4, timeout=DONE_TIMEOUT_S)
        own_redis.kill()
        async with http.post(f"{server.url}/v1/async/chat/completions", json=body,
                             headers=AUTH) as resp:
            assert resp.status == 503  # refused, not accepted and lost
            assert resp.headers["Retry-After"] == "1"
        await own_redis.start()
        statuses: dict[str, str] = {}

        async def all_done() -> bool:
            for job_id in ids:
                if statuses.get(job_id) != "completed":
                    async with http.get(f"{server.url}/v1/async/jobs/{job_id}",
                                        headers=AUTH) as resp:
                        statuses[job_id] = (await resp.json())["status"] \
                            if resp.status == 200 else f"HTTP {resp.status}"
            return all(statuses.get(i) == "completed" for i in ids)

        await eventually(all_done, timeout=DONE_TIMEOUT_S, interval=0.2)


async def test_graceful_shutdown_hands_jobs_in_flight_back_at_once(standin, skyroute, tmp_path,
                                                                   sdk):
    """An instance shut down mid-batch puts its claimed lines back in the queue, so the next
    one runs them without waiting out the (10 minute) visibility timeout."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.05
    text = routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data", concurrency=8,
                                                     visibility_timeout="10m"))
    path = tmp_path / "first.yaml"
    path.write_text(text)
    first = Server(load_config(path), port=0, grace_s=0.01)
    await first.start()
    try:
        client = sdk(first)
        batch = await start_batch(client, 100)
        await up.wait_for(lambda u: u.requests_total >= 10, timeout=DONE_TIMEOUT_S)
    finally:
        await first.aclose()
    second = await skyroute(text)
    done = await wait_batch(sdk(second), batch.id, "completed", "failed")
    assert done.status == "completed" and done.request_counts.completed == 100



async def test_a_draining_instance_claims_no_new_job(standin, tmp_path):
    """Once shutdown starts (draining), the lane starts nothing new: the job it runs ends, the
    rest stay queued for the next instance, although a client's request still holds the
    instance in its grace period (the lane is still alive)."""
    up, slow = await standin("a"), await standin("slow")
    up.behaviour.ttft_s, slow.behaviour.ttft_s = 1.0, 3.0
    path = tmp_path / "routing.yaml"
    path.write_text(routing_yaml(
        [entry(up), entry(slow, models="{slow: deepseek-chat}")],
        "- model: chat\n  targets: [a]\n- model: slow\n  targets: [slow]\n",
        extra=jobs_yaml(tmp_path / "data", concurrency=1)))
    server = Server(load_config(path), port=0, grace_s=10.0)
    await server.start()
    closing: asyncio.Task[None] | None = None
    try:
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for i in range(4):
                body = {"model": "chat", "messages": [{"role": "user", "content": f"job {i}"}]}
                async with http.post(f"{server.url}/v1/async/chat/completions", json=body,
                                     headers=AUTH) as resp:
                    assert resp.status == 202
            await up.wait_for(lambda u: u.requests_total >= 1, timeout=DONE_TIMEOUT_S)
            interactive = asyncio.ensure_future(http.post(
                f"{server.url}/v1/chat/completions", headers=AUTH,
                json={"model": "slow", "messages": [{"role": "user", "content": "hi"}]}))
            await slow.wait_for(lambda u: u.requests_total >= 1, timeout=DONE_TIMEOUT_S)
            closing = asyncio.create_task(server.aclose())  # draining from here on
            async with await interactive as resp:  # answered within the grace period
                assert resp.status == 200
            await closing
    finally:
        if closing is None:
            await server.aclose()
    # The first job ended (1 s) long before the client's request (3 s), and its slot was
    # free the whole time: a lane ignoring the drain would have started the next job.
    assert up.requests_total == 1
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        states = Counter(state for (state,) in db.execute("SELECT state FROM jobs"))
    assert states["queued"] == 3


async def _cancel_as_woken(wait: Callable[[asyncio.Event], Any]) -> bool:
    """Whether a job loop parked in ``wait`` ends when cancelled in the tick it is woken."""
    wake = asyncio.Event()

    async def loop() -> None:  # as the lane and the webhook sender wait for work
        while True:
            await wait(wake)
            wake.clear()

    task = asyncio.create_task(loop())
    for _ in range(3):  # let it park in wait() (no timer involved)
        await asyncio.sleep(0)
    wake.set()  # a job finished ...
    task.cancel()  # ... as shutdown cancels the loop
    await asyncio.wait({task}, timeout=1.0)
    ended = task.done()
    task.cancel()
    await asyncio.wait({task}, timeout=CALL_TIMEOUT_S)
    return ended


async def test_a_job_loop_cancelled_as_it_is_woken_ends_at_once():
    """The shutdown stall: asyncio.wait_for on Python 3.11 swallows a cancellation landing as
    its event is set, so a job loop outlived shutdown (jobs_close_timed_out after 10 s, a
    120 s hang before that bound). The loops wait with wake_within, which does not."""
    assert await _cancel_as_woken(lambda wake: wake_within(wake, 0.2))
    if sys.version_info < (3, 12):  # the cause, shown: wait_for does swallow it there
        async def wait_for(wake: asyncio.Event) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.2)  # noqa: TID251 - the cause, shown

        assert not await _cancel_as_woken(wait_for)


@pytest.mark.parametrize("wait", ["pause", "wake_within"])
async def test_a_job_loop_whose_cancellation_a_library_swallowed_stops_at_its_next_pause(wait):
    """The second shutdown stall: redis-py sends each command through asyncio.wait_for, which
    on Python 3.11 can swallow the shutdown's CancelledError; the loop then ran on (a
    `skyroute run` with the Redis queue took 10 s, or for ever, to stop). A loop's pause
    stops a task that was cancelled, whoever swallowed the error."""
    turns = 0
    wake = asyncio.Event()

    async def swallowing_command() -> None:  # as the store call does when the cancel is lost
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return

    async def loop() -> None:
        nonlocal turns
        while True:
            turns += 1
            await swallowing_command()
            await (pause(0.01) if wait == "pause" else wake_within(wake, 0.01))

    task = asyncio.create_task(loop())
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=CALL_TIMEOUT_S)
    assert task.cancelled() and turns == 1


async def test_reload_resizes_the_lane(standin, skyroute, tmp_path):
    """A reload that changes jobs.concurrency resizes the lane without a restart."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data",
                                                                      concurrency=8)))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        assert (await lane(http, server))["limit"] == 8
        assert server.config_path is not None
        server.config_path.write_text(routing_yaml([entry(up)], extra=jobs_yaml(
            tmp_path / "data", concurrency=3)))

        async def resized() -> bool:
            return (await lane(http, server))["limit"] == 3

        await eventually(resized, timeout=DONE_TIMEOUT_S)


async def test_finished_work_past_retention_is_deleted(standin, skyroute, tmp_path, sdk):
    """With jobs.retention passed, an ended batch (its output file too) and a finished async
    job are gone after the next purge (one runs at start)."""
    up = await standin("a")
    text = routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data", retention="1s"))
    server = await skyroute(text)
    client = sdk(server)
    batch = await start_batch(client, 3)
    done = await wait_batch(client, batch.id, "completed")
    output = tmp_path / "data" / "files" / done.output_file_id
    assert output.is_file()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        async with http.post(f"{server.url}/v1/async/chat/completions", headers=AUTH,
                             json={"model": "chat", "messages": []}) as resp:
            job = await resp.json()

        async def finished() -> bool:
            async with http.get(job["status_url"], headers=AUTH) as resp:
                return (await resp.json())["status"] == "completed"

        await eventually(finished, timeout=DONE_TIMEOUT_S)
        await asyncio.sleep(1.1)  # let the 1 s retention pass: the point of this test
        later = await skyroute(text)  # purges at start
        gone_url = job["status_url"].replace(server.url, later.url)

        async def purged() -> bool:
            # The rows go in one transaction, then their files: both must be gone.
            async with http.get(gone_url, headers=AUTH) as resp:
                return resp.status == 404 and not output.exists()

        await eventually(purged, timeout=DONE_TIMEOUT_S)
    kept = {x.id for x in (await sdk(later).files.list()).data}
    assert batch.input_file_id in kept  # the input stays


async def test_batch_expires_after_its_24h_window(standin, skyroute, tmp_path, sdk):
    """A batch still running when its 24h completion window ends is expired: the lines that
    ran are in the output file, the others in the error file as batch_expired."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra=jobs_yaml(tmp_path / "data")))
    client = sdk(server)
    first = await start_batch(client, 2)
    await wait_batch(client, first.id, "completed")
    up.behaviour.mode = "error"  # the next batch's lines wait in backoff
    up.behaviour.retry_after_s = 30
    batch = await start_batch(client, 5)
    assert batch.expires_at == batch.created_at + 24 * 3600
    await wait_batch(client, batch.id, "in_progress")
    # Only the clock the windows are checked against moves: a day passes at once.
    server.app[JOBS].wall = lambda: time.time() + 24 * 3600 + 1
    expired = await wait_batch(client, batch.id, "expired")
    assert expired.expired_at is not None and expired.output_file_id is None
    errors = await read_lines(client, expired.error_file_id)
    assert sorted(line["custom_id"] for line in errors) == [f"req-{i}" for i in range(5)]
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert (await client.batches.retrieve(first.id)).status == "completed"  # ended: stays
