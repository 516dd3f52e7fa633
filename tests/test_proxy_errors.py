"""Every error is OpenAI-shaped JSON, aiohttp's own answers included; request parsing holds."""

from __future__ import annotations

import asyncio
import io
import json

import openai
import pytest
from aiohttp import web
from hypothesis import example, given
from hypothesis import strategies as st
from skyroute.proxy._errors import InvalidJSON
from skyroute.proxy._handlers import MAX_JSON_DEPTH, parse_payload

from .conftest import CLIENT_KEY, client_for, routing_yaml, upstream_yaml
from .hostile import raw_request

AUTH = f"Authorization: Bearer {CLIENT_KEY}"


def _post(body: bytes, extra: str = "") -> tuple[str, bytes]:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}{extra}")
    return head, body


CASES = {
    "bad framing (aiohttp's parser)": ("GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n",
                                       b"", 400),
    "header over 8 KiB (aiohttp's parser)": (
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 9000}", b"", 431),
    "body over max_body_bytes": (*_post(b" " * (17 << 20)), 413),
    "deep JSON": (*_post(b"[" * 100_000 + b"]" * 100_000), 400),
    "JSON deeper than the limit": (
        *_post(b'{"model": "chat", "x": ' + b"[" * 70 + b"]" * 70 + b"}"), 400),
    "NaN in JSON": (*_post(b'{"model": "chat", "temperature": NaN}'), 400),
    "wrong method": ("DELETE /health HTTP/1.1\r\nHost: x", b"", 405),
    "no such path": ("GET /nope HTTP/1.1\r\nHost: x", b"", 404),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_error_is_openai_shaped_json(case, standin, skyroute):
    """aiohttp's own 400/431/405/404, 413 and bad JSON: all OpenAI JSON, client errors typed
    invalid_request_error."""
    head, body, status = CASES[case]
    up = await standin("a")
    server = await skyroute(routing_yaml([upstream_yaml(up)]))
    answer = await raw_request(server.port, head, body)
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert up.requests_total == 0


@given(st.binary(max_size=300))
@example(b"[" * 5000)
@example(b'{"a": Infinity}')
@example(b'{"model": ' + b"9" * 5000 + b"}")
@example(b"\xff\xfe{}")
def test_parse_payload_never_raises_anything_but_InvalidJSON(body: bytes) -> None:
    """Any bytes at all: a dict, None (empty), or InvalidJSON; never another exception."""
    try:
        payload = parse_payload(body)
    except InvalidJSON:
        return
    assert payload is None or isinstance(payload, dict)


@given(st.recursive(st.none() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=40))
def test_parse_payload_accepts_every_shallow_object(value: object) -> None:
    """Any JSON object within the depth limit parses to itself."""
    body = json.dumps({"v": value}).encode()
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        assert parse_payload(body) == {"v": value}


async def test_an_error_body_sent_in_several_chunks_reaches_the_client_whole(skyroute):
    """An upstream's error answer sent in parts, on the aiohttp path (a streamed upload), is
    read whole (up to the bound) before it is passed on: the client's error says all of it,
    not the first part."""
    parts = [b'{"error": {"message": "the file is ', b"not valid JSONL: line 3 ",
             b'is not an object", "type": "invalid_request_error", "code": null}}']

    async def refuse(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            await asyncio.sleep(0.05)  # pacing, as a slow upstream sends: not synchronisation
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/files", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        server = await skyroute(routing_yaml([
            f"  - name: slow\n    url: http://127.0.0.1:{port}/v1\n    api_key: sk-up\n"
            "    region: test\n    models: {chat: deepseek-chat}\n"]))
        async with client_for(server) as client:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.files.create(file=("f.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
        assert refused.value.response.content == b"".join(parts)
    finally:
        await runner.cleanup()
