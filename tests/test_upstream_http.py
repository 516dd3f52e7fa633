"""The lean upstream client (``proxy._upstream_http``) against real local servers.

aiohttp servers stand in for well-behaved upstreams; raw asyncio servers for the
misbehaving ones (resets mid-body, answers that never come). Every test runs on
asyncio's own loop and on uvloop (skyroute's).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from skyroute.proxy._forward import error_category
from skyroute.proxy._upstream_http import (
    MAX_HEAD_BYTES,
    ConnectFailed,
    InvalidAnswer,
    UpstreamPool,
    _ssl_context,
    origin_of,
    request_head,
)
from skyroute.proxy.demo import StandinUpstream

from .conftest import CALL_TIMEOUT_S, UPSTREAM_KEY, client_for, eventually, routing_yaml

pytestmark = pytest.mark.timeout(60)
JSON = {"Content-Type": "application/json"}


Scenario = Callable[[Callable[..., UpstreamPool], Path], Awaitable[None]]


def on_both_loops(scenario: Scenario) -> Callable[[str, Path], None]:
    """A test that runs ``scenario(pools, tmp_path)`` on asyncio's loop and on uvloop.

    ``pools(limit, **kwargs)`` makes an ``UpstreamPool``; each is closed at the end.
    """
    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test(loop: str, tmp_path: Path) -> None:
        async def main() -> None:
            made: list[UpstreamPool] = []

            def pools(limit: int = 10, **kwargs: object) -> UpstreamPool:
                kwargs.setdefault("keepalive_s", 30.0)
                pool = UpstreamPool(limit, **kwargs)  # type: ignore[arg-type]
                made.append(pool)
                return pool

            try:
                async with asyncio.timeout(30):
                    await scenario(pools, tmp_path)
            finally:
                for pool in made:
                    pool.close()

        (uvloop.run if loop == "uvloop" else asyncio.run)(main())

    test.__name__ = test.__qualname__ = scenario.__name__
    test.__doc__ = scenario.__doc__
    return test


@contextlib.asynccontextmanager
async def app_server(app: web.Application, *,
                     ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """An aiohttp server on a free port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[None]]) -> AsyncIterator[str]:
    """A TCP server whose every connection ``handle`` serves by hand; each is closed at the
    end, so none is left for the garbage collector to find after its loop closed."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handle(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (``Content-Length`` bodies only)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server's kernel does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def peers_app(seen: list[int]) -> web.Application:
    """Answers JSON and records the client port of each request's connection."""
    async def chat(request: web.Request) -> web.Response:
        seen.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.read()
        return web.Response(body=b'{"echo": ' + body + b"}", headers=JSON)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def post(pool: UpstreamPool, base: str, body: bytes = b"{}", *,
               idle_s: float = CALL_TIMEOUT_S, connect_s: float = CALL_TIMEOUT_S,
               path: str = "/chat/completions"):
    return await pool.request("POST", base, path, CIMultiDict(JSON), body,
                              connect_s=connect_s, idle_s=idle_s)


@on_both_loops
async def test_a_connection_is_reused_once_its_answer_was_read_whole(pools, tmp_path):
    seen: list[int] = []
    pool = pools()
    async with app_server(peers_app(seen)) as base:
        for n in range(3):
            answer = await post(pool, base, b'{"n": %d}' % n)
            assert answer.status == 200 and answer.content_type == "application/json"
            assert await answer.read() == b'{"echo": {"n": %d}}' % n
            answer.close()
        assert len(set(seen)) == 1  # one connection carried all three
        assert pool.idle == 1 and pool.busy == 0


@on_both_loops
async def test_a_server_that_closes_after_its_answer_gets_a_new_connection(pools, tmp_path):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    pool = pools()
    async with raw_server(handle) as base:
        for _ in range(2):
            answer = await post(pool, base)
            assert await answer.read() == b"{}"
            answer.close()
            assert pool.idle == 0
        await eventually(lambda: pool.busy == 0)


@on_both_loops
async def test_a_body_that_ends_with_the_connection_is_read_whole_and_not_reused(pools, tmp_path):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
        writer.close()

    pool = pools()
    async with raw_server(handle) as base:
        answer = await post(pool, base)
        assert await answer.read() == b"all of it"
        assert pool.idle == 0
        await eventually(lambda: pool.busy == 0)


@on_both_loops
async def test_chunked_sse_arrives_event_by_event(pools, tmp_path):
    """Each event reaches the reader before the server writes the next."""
    next_event = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)  # no length: chunked
        for n in range(3):
            await resp.write(b"data: %d\n\n" % n)
            await next_event.wait()
            next_event.clear()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    pool = pools()
    async with app_server(app) as base:
        answer = await post(pool, base)
        assert answer.content_type == "text/event-stream"
        assert answer.headers["Transfer-Encoding"] == "chunked"
        for n in range(3):
            async with asyncio.timeout(CALL_TIMEOUT_S):
                chunk = await answer.content.readany()
            assert chunk == b"data: %d\n\n" % n
            next_event.set()
        assert [c async for c in answer.content.iter_any()] == [b"data: [DONE]\n\n"]
        answer.close()
        assert pool.idle == 1  # read whole: kept


@on_both_loops
async def test_a_reset_mid_body_is_a_payload_error(pools, tmp_path):
    for framing in ("content-length", "chunked"):
        got_first = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         framing: str = framing, got_first: asyncio.Event = got_first) -> None:
            await read_request(reader)
            if framing == "chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"9\r\ndata: 1\n\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ndata: 1\n\n")
            await writer.drain()
            await got_first.wait()
            reset(writer)

        pool = pools()
        async with raw_server(handle) as base:
            answer = await post(pool, base)
            assert await answer.readany() == b"data: 1\n\n"
            got_first.set()
            with pytest.raises(aiohttp.ClientPayloadError) as caught:
                async with asyncio.timeout(0.5):
                    await answer.read()
            # The category skyroute logs and counts, as with aiohttp's client.
            assert error_category(caught.value) == "ClientPayloadError"
            answer.close()
            await eventually(lambda pool=pool: pool.busy == 0 and pool.idle == 0)


@on_both_loops
async def test_a_close_before_the_answer_is_a_server_disconnect(pools, tmp_path):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    pool = pools()
    async with raw_server(handle) as base:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(pool, base)
        await eventually(lambda: pool.busy == 0)


@on_both_loops
async def test_garbage_or_endless_headers_are_an_invalid_answer(pools, tmp_path):
    for answer_bytes in (b"SMTP ready\r\n\r\n",
                         b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (MAX_HEAD_BYTES + 10)):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         answer_bytes: bytes = answer_bytes) -> None:
            await read_request(reader)
            writer.write(answer_bytes)
            await writer.drain()
            await reader.read(1)  # until the client closes
            writer.close()

        pool = pools()
        async with raw_server(handle) as base:
            with pytest.raises(InvalidAnswer):
                await post(pool, base)
            await eventually(lambda pool=pool: pool.busy == 0 and pool.idle == 0)


@on_both_loops
async def test_an_interim_100_is_skipped_for_the_real_answer(pools, tmp_path):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
                         b"Content-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    pool = pools()
    async with raw_server(handle) as base:
        for _ in range(2):  # and the connection is reused after it
            answer = await post(pool, base)
            assert answer.status == 201 and answer.reason == "Created"
            assert answer.headers.getall("x-a") == ["1", "2"]
            assert await answer.read() == b"ok"
            assert pool.idle == 1


@on_both_loops
async def test_a_server_that_hangs_up_at_once_leaves_the_pool_count_right(pools, tmp_path):
    """However the close races the request, each failure gives its connection back."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    pool = pools(limit=1)
    async with raw_server(handle) as base:
        for _ in range(20):
            with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
                await post(pool, base, connect_s=1.0)
            await eventually(lambda: pool.busy == 0)


@on_both_loops
async def test_a_half_read_answer_closes_its_connection(pools, tmp_path):
    seen: list[int] = []

    async def big(request: web.Request) -> web.Response:
        seen.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return web.Response(body=b"x" * (4 << 20))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", big)
    pool = pools()
    async with app_server(app) as base:
        answer = await post(pool, base)
        assert await answer.read(10) == b"x" * 10
        answer.close()
        await eventually(lambda: pool.busy == 0)
        assert pool.idle == 0
        answer = await post(pool, base)
        assert len(await answer.read()) == 4 << 20  # paused and resumed on the way
        assert len(set(seen)) == 2


@on_both_loops
async def test_requests_beyond_the_limit_wait_for_a_connection(pools, tmp_path):
    release = asyncio.Event()
    arrived = 0

    async def held(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return web.Response(body=b"{}", headers=JSON)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", held)
    pool = pools(limit=2)
    async with app_server(app) as base:
        calls = [asyncio.create_task(post(pool, base)) for _ in range(3)]
        try:
            await eventually(lambda: arrived == 2)
            assert pool.busy == 2 and not any(c.done() for c in calls)
            release.set()
            async with asyncio.timeout(CALL_TIMEOUT_S):
                answers = await asyncio.gather(*calls)
        finally:
            for call in calls:
                call.cancel()
        for answer in answers:
            assert await answer.read() == b"{}"
            answer.close()
        assert arrived == 3 and pool.busy == 0 and pool.idle == 2


@on_both_loops
async def test_a_pool_wait_longer_than_the_connect_timeout_fails_as_a_timeout(pools, tmp_path):
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"{}")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", held)
    pool = pools(limit=1)
    async with app_server(app) as base:
        first = asyncio.create_task(post(pool, base))
        try:
            await eventually(lambda: pool.busy == 1)
            with pytest.raises(aiohttp.ConnectionTimeoutError):
                await post(pool, base, connect_s=0.1)
            assert pool.busy == 1  # the waiter left the line
        finally:
            release.set()
            async with asyncio.timeout(CALL_TIMEOUT_S):
                (await first).close()


@on_both_loops
async def test_an_upstream_silent_longer_than_the_idle_timeout_fails_as_a_timeout(pools, tmp_path):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await reader.read(1)  # then nothing, until the client goes away
        writer.close()

    pool = pools()
    async with raw_server(handle) as base:
        answer = await post(pool, base, idle_s=0.2)
        with pytest.raises(aiohttp.SocketTimeoutError) as caught:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await answer.read()
        assert isinstance(caught.value, TimeoutError)  # _forward's deadline handling sees it
        answer.close()
        await eventually(lambda: pool.busy == 0)


@on_both_loops
async def test_a_refused_connection_is_a_connect_failure(pools, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = pools()
    with pytest.raises(ConnectFailed) as caught:
        await post(pool, f"http://127.0.0.1:{port}")
    assert error_category(caught.value) == "ECONNREFUSED"
    assert pool.busy == 0


@on_both_loops
async def test_a_cancelled_request_closes_its_connection(pools, tmp_path):
    arrived = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read(1)  # the client's close ends this
        writer.close()

    pool = pools()
    async with raw_server(handle) as base:
        call = asyncio.create_task(post(pool, base))
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: pool.busy == 0)
        assert pool.idle == 0


@on_both_loops
async def test_idle_connections_expire_after_the_keepalive(pools, tmp_path):
    seen: list[int] = []
    pool = pools(keepalive_s=0.2)
    async with app_server(peers_app(seen)) as base:
        (await post(pool, base)).close()
        assert pool.idle == 1
        await eventually(lambda: pool.idle == 0)  # the sweep closed it
        answer = await post(pool, base)
        await answer.read()
        assert len(set(seen)) == 2


@on_both_loops
async def test_https_with_the_pools_ssl_context(pools, tmp_path):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    seen: list[int] = []
    pool = pools(ssl_context=client_ctx)
    async with app_server(peers_app(seen), ssl_context=server_ctx) as base:
        for _ in range(2):
            answer = await post(pool, base)
            assert await answer.read() == b'{"echo": {}}'
        assert len(set(seen)) == 1
    # The default context (system CAs) does not trust the test's certificate.
    async with app_server(peers_app(seen), ssl_context=server_ctx) as base:
        with pytest.raises(ConnectFailed) as caught:
            await post(pools(), base)
        assert isinstance(caught.value.os_error, ssl.SSLCertVerificationError)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, its own CA."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_request_head_has_what_aiohttp_would_add():
    origin = origin_of("https://api.example.com:8443/v1/")
    head = request_head("POST", origin, "/chat/completions?x=1",
                        CIMultiDict({"Authorization": "Bearer k"}), b"{}")
    assert head == (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: api.example.com:8443\r\n"
                    b"Authorization: Bearer k\r\nAccept: */*\r\nContent-Length: 2\r\n"
                    b"Content-Type: application/octet-stream\r\n\r\n")
    get = request_head("GET", origin_of("http://[::1]/"), "/models", CIMultiDict(), None)
    assert get == b"GET /models HTTP/1.1\r\nHost: [::1]\r\nAccept: */*\r\n\r\n"


@given(name=st.sampled_from(["X-Test", "Authorization"]),
       value=st.text(alphabet=st.characters(codec="latin-1"), max_size=20))
def test_no_header_value_can_add_a_line_to_the_request(name, value):
    headers = CIMultiDict({name: value})
    try:
        head = request_head("POST", origin_of("http://h"), "/x", headers, b"")
    except ValueError:
        assert "\r" in value or "\n" in value
    else:
        assert head.count(b"\r\n") == 7  # request line, 5 headers, blank line


@pytest.fixture
def trusted_cert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ssl.SSLContext]:
    """A server context whose certificate the default SSL context trusts (SSL_CERT_FILE)."""
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    _ssl_context.cache_clear()  # made again, reading SSL_CERT_FILE
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    yield server_ctx
    _ssl_context.cache_clear()


async def test_skyroute_reaches_an_https_upstream_with_the_default_ssl_context(
        skyroute, trusted_cert):
    """JSON and a stream through skyroute to an https upstream, on one kept connection."""
    up = StandinUpstream("tls", api_key=UPSTREAM_KEY)
    seen: set[int] = set()

    @web.middleware
    async def peers(request: web.Request, handler):  # type: ignore[no-untyped-def]
        seen.add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return await handler(request)

    up.app.middlewares.append(peers)
    async with app_server(up.app, ssl_context=trusted_cert) as base:
        assert base.startswith("https://")
        server = await skyroute(routing_yaml([f"""\
  - name: tls
    url: {base}
    api_key: {UPSTREAM_KEY}
    region: test
    models: {{chat: deepseek-chat}}
"""]))
        async with client_for(server) as client:
            reply = await client.chat.completions.create(model="chat", messages=[
                {"role": "user", "content": "hi"}])
            assert "tls" in reply.choices[0].message.content
            stream = await client.chat.completions.create(model="chat", stream=True, messages=[
                {"role": "user", "content": "hi"}])
            text = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
            assert "tls" in text
        assert up.requests_total == 2 and len(seen) == 1
