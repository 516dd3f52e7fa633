"""The baseline: a bare aiohttp+uvloop pass-through proxy, no routing, no checks, no logs.

Usage: python bench/_passthrough.py UPSTREAM_BASE_URL UPSTREAM_KEY
Listens on 127.0.0.1 (a free port) and prints {"url": ...} on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import uvloop
from aiohttp import web


async def main(upstream: str, key: str) -> None:
    # No total timeout: bench/streams.py holds streams open for minutes.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=None))
    auth = f"Bearer {key}"

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        async with session.post(upstream + request.match_info["tail"], data=body,
                                headers=headers) as up:
            ctype = up.headers.get("Content-Type", "application/json")
            if not ctype.startswith("text/event-stream"):
                return web.Response(status=up.status, body=await up.read(),
                                    headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(json.dumps({"url": f"http://127.0.0.1:{runner.addresses[0][1]}"}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1].rstrip("/") + "/", sys.argv[2]))
