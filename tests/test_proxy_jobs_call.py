"""proxy._jobs_call: a job's call served by an application's handlers, without a socket."""

from __future__ import annotations

import io
import json

from aiohttp import web
from aiohttp.payload import BytesIOPayload
from skyroute.proxy._jobs_call import call_in_process


async def streamed(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"data: " + await request.content.read() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def whole(request: web.Request) -> web.Response:
    return web.json_response({"peer": request.remote, "url": str(request.url),
                              "client": request.headers["X-Client"]},
                             status=429, headers={"Retry-After": "3"})


async def from_payload(request: web.Request) -> web.Response:
    return web.Response(body=BytesIOPayload(io.BytesIO(b"kept whole")), status=201)


async def test_whole_streamed_and_payload_answers_and_unknown_paths():
    app = web.Application()
    app.router.add_post("/v1/streamed", streamed)
    app.router.add_post("/v1/whole", whole)
    app.router.add_post("/v1/payload", from_payload)
    runner = web.AppRunner(app)
    await runner.setup()  # freezes the app as a server's start does
    try:
        answer = await call_in_process(app, "POST", "/v1/whole", b"{}", {"X-Client": "k"})
        assert (answer.status, answer.headers["Retry-After"]) == (429, "3")
        assert json.loads(answer.body) == {"peer": "127.0.0.1", "client": "k",
                                           "url": "http://127.0.0.1/v1/whole"}
        answer = await call_in_process(app, "POST", "/v1/streamed", b'{"n": 1}', {})
        assert answer.status == 200
        assert answer.body == b'data: {"n": 1}\n\ndata: [DONE]\n\n'  # no chunked framing
        answer = await call_in_process(app, "POST", "/v1/payload", None, {})
        assert (answer.status, answer.body) == (201, b"kept whole")
        answer = await call_in_process(app, "POST", "/v1/nowhere", None, {})
        assert answer.status == 404
    finally:
        await runner.cleanup()
