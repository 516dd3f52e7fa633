"""``skyroute demo``: the embedded default, a whole setup on 127.0.0.1 with no keys.

Three stand-in cloud regions with different latency, a stand-in local GPU pool of
two vLLM-style servers, and skyroute in front of them, serving ``proxy/demo.yaml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from importlib import resources

from routing import parse_config

from ._server import Server
from ._standin import Behaviour, StandinUpstream

DEMO_KEY = "sk-skyroute-demo"
UPSTREAM_KEY = "sk-upstream"

#: name -> (env var for its URL, time to first token): three regions, one past 200 ms.
_REGIONS = {
    "us-east": ("DEMO_US_EAST_URL", 0.04),
    "eu-west": ("DEMO_EU_WEST_URL", 0.09),
    "ap-south": ("DEMO_AP_SOUTH_URL", 0.25),
}
_GPU = {"gpu-a": "DEMO_GPU_A_URL", "gpu-b": "DEMO_GPU_B_URL"}


def demo_config_text() -> str:
    """The embedded routing file, as shipped in the package."""
    return resources.files("proxy").joinpath("demo.yaml").read_text(encoding="utf-8")


def _try_lines(url: str, others: list[str]) -> str:
    peers = "".join(f"\nskyroute demo instance, peered, serving on {u}" for u in others)
    session = (f"""
  # a session pinned on one instance keeps its upstream on the others:
  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
       -H 'X-Session-ID: s1' -H 'Content-Type: application/json' \\
       -d '{{"model": "chat", "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl -s {others[0]}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
       -H 'X-Session-ID: s1' -H 'Content-Type: application/json' \\
       -d '{{"model": "chat", "messages": [{{"role": "user", "content": "hi"}}]}}'
  # key sk-skyroute-limited has rpm: 6 across all instances together (the 7th gets 429)""" if others
               else "")
    return f"""
skyroute demo is serving on {url}  (Ctrl-C stops it){peers}

Try it:
  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "chat", "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl -sN {url}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "chat", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'
  python -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='{DEMO_KEY}')
r = c.chat.completions.create(model='chat', messages=[{{'role': 'user', 'content': 'hi'}}])
print(r.choices[0].message.content)"
  curl -s {url}/health
  curl -s {url}/metrics | grep skyroute_{session}
""".rstrip()


def _instance_config(text: str, index: int, ports: list[int]) -> str:
    """The demo file for instance ``index`` of a peered group on ``ports``."""
    peers = ", ".join(f"ws://127.0.0.1:{p}/sync" for i, p in enumerate(ports) if i != index)
    text = text.replace("  id: demo\n", f"  id: demo-{index}\n")
    return text + f"sync:\n  token: ${{SKYROUTE_SYNC_TOKEN:-demo-sync-token}}\n  peers: [{peers}]\n"


async def run_demo(*, port: int = 8080, host: str = "127.0.0.1", instances: int = 1,
                   ready: asyncio.Event | None = None) -> None:
    """Start the stand-ins and skyroute, print how to try them, serve until stopped.

    With ``instances`` > 1, that many skyroute instances run on consecutive ports
    (or free ones with ``port=0``), peered over state sync.
    """
    standins: list[StandinUpstream] = []
    env: dict[str, str] = {"DEMO_UPSTREAM_KEY": UPSTREAM_KEY, "SKYROUTE_DEMO_KEY": DEMO_KEY}
    models = ("deepseek-chat", "text-embedding-3-small")
    for name, (_, ttft) in _REGIONS.items():
        standins.append(StandinUpstream(name, models=models, api_key=UPSTREAM_KEY,
                                        behaviour=Behaviour(ttft_s=ttft, token_delay_s=0.02)))
    for name in _GPU:
        standins.append(StandinUpstream(name, models=("deepseek-r1-distill-qwen-7b",),
                                        behaviour=Behaviour(ttft_s=0.015, token_delay_s=0.01),
                                        metrics_format="vllm"))
    socks = [_bind(host, port + i if port else 0) for i in range(instances)]
    ports = [sock.getsockname()[1] for sock in socks]
    try:
        for standin, var in zip(standins, [*[v for v, _ in _REGIONS.values()], *_GPU.values()],
                                strict=True):
            await standin.start(host="127.0.0.1", port=0)
            env[var] = standin.base_url
        async with contextlib.AsyncExitStack() as stack:
            servers = []
            for index, sock in enumerate(socks):
                text = demo_config_text()
                if instances > 1:
                    text = _instance_config(text, index, ports)
                config = parse_config(text, source="<embedded demo.yaml>", env=env)
                servers.append(await stack.enter_async_context(Server(config, sock=sock)))
            print(_try_lines(servers[0].url, [s.url for s in servers[1:]]), flush=True)
            if ready is not None:
                ready.set()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        for standin in standins:
            with contextlib.suppress(Exception):
                await standin.aclose()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
