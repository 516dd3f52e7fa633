"""An instance that names no Redis does not load redis-py: ~6 MiB of RSS per worker (issue
14's goal is at most 80 MB per worker), loaded only by the parts that use it (cache.redis,
jobs.redis, sync.relay)."""

from __future__ import annotations

import json
import textwrap

import pytest

from .conftest import run_script

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, tempfile
    from pathlib import Path

    import aiohttp
    from skyroute.proxy import Server, load_config
    from skyroute.proxy.demo import StandinUpstream

    async def main():
        up = StandinUpstream("a")
        await up.start()
        data = Path(tempfile.mkdtemp())
        path = data / "routing.yaml"
        path.write_text(
            "listen: 127.0.0.1:0\\n"
            "auth:\\n  api_keys:\\n    - name: t\\n      key: sk-client\\n"
            "cache:\\n  ttl: 60s\\n"
            f"jobs:\\n  data_dir: {data / 'jobs'}\\n"
            f"upstreams:\\n  - name: a\\n    url: {up.base_url}\\n    api_key: sk-up\\n"
            "    region: local\\n    models: {chat: deepseek-chat}\\n")
        server = Server(load_config(path), config_path=None, port=0)
        await server.start()
        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                async with http.post(f"{server.url}/v1/chat/completions",
                                     headers={"Authorization": "Bearer sk-client"},
                                     json={"model": "chat", "messages": []}) as resp:
                    assert resp.status == 200, await resp.text()
                async with http.get(f"{server.url}/metrics") as resp:
                    assert resp.status == 200
        finally:
            await server.aclose()
            await up.aclose()
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "redis")))

    asyncio.run(main())
""")


@pytest.mark.timeout(120)
async def test_an_instance_without_redis_does_not_load_redis_py():
    returncode, out, err = await run_script("-c", SCRIPT, timeout_s=90)
    assert returncode == 0, err.decode()[-3000:]
    assert json.loads(out.decode().splitlines()[-1]) == []
