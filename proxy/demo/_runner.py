"""``skyroute demo``: the embedded default, a whole setup on 127.0.0.1 with no keys.

Three stand-in cloud regions with different latency, a stand-in local GPU pool of
two vLLM-style servers, and skyroute in front of them, serving ``demo.yaml`` beside this module.
With ``instances`` > 1 the instances are peered over state sync; with ``prometheus_bin``
a real Prometheus scrapes them all every second and every instance reads upstream
latency back from it (``deploy/local-multiregion.sh`` runs both). The printed
instructions include each stand-in's control URL, so a user can make a region slow
and watch traffic move.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
from collections.abc import Sequence
from importlib import resources

from skyroute.routing import Config, parse_config

from .._server import Server
from .._startup import listen_error
from ._local_prometheus import LocalPrometheus
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
#: Past the route's 200 ms threshold, and clearly so for a p95 that mixes in older samples.
_SLOW_TTFT_S = 0.4
#: How often Prometheus scrapes and skyroute queries it: short, so a change shows in seconds.
PROMETHEUS_INTERVAL_S = 1.0
#: Where requests go, fastest first, while nothing is slow (``chat`` is lowest-latency):
#: making the first of these slow moves traffic to the next.
_CHAT_ORDER = (("local-gpu", ("gpu-a", "gpu-b")), ("us-east", ("us-east",)),
               ("eu-west", ("eu-west",)))
_CHAT_BODY = '{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'


def demo_config_text() -> str:
    """The embedded routing file, as shipped in the package."""
    return resources.files(__package__).joinpath("demo.yaml").read_text(encoding="utf-8")


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


def _with_prometheus(text: str, url: str) -> str:
    """The demo file reading upstream latency from the Prometheus at ``url`` every second."""
    section = (f"  prometheus:\n    url: {url}\n"
               f"    interval: {int(PROMETHEUS_INTERVAL_S * 1000)}ms\n")
    heading = re.compile(r"^latency:[ \t]*(#.*)?\n", flags=re.M)
    if heading.search(text):  # demo.yaml has a latency section of its own: add to it
        return heading.sub(lambda m: m.group(0) + section, text, count=1)
    return text.rstrip("\n") + "\nlatency:\n" + section


def _observe_lines(urls: Sequence[str], config: Config, prometheus: LocalPrometheus | None,
                   ) -> str:
    """Where to look: each instance's /health, /admin/routing, the Prometheus UI."""
    lines = ["Each instance's view (upstream states, latency and its source, peers):",
             *[f"  curl -s {u}/health" for u in urls]]
    if config.admin_key:
        lines.append(f"  curl -s {urls[0]}/admin/routing "
                     f"-H 'Authorization: Bearer {config.admin_key}'")
    if prometheus is not None and config.latency.prometheus is not None:
        lines += ["", f"Prometheus UI: {prometheus.url}  (scrapes every skyroute instance and "
                  "the GPU servers every second)",
                  "  PromQL to paste: p95 time to first token per upstream, what routing reads "
                  "from it every second:",
                  f"    {config.latency.prometheus.query}",
                  "  and where requests go:",
                  "    sum by (upstream) (rate(skyroute_requests_total[1m]))"]
    return "\n".join(lines)


def _control_lines(url: str, standins: Sequence[StandinUpstream], config: Config) -> str:
    """How to make upstreams slow from outside and watch ``X-Skyroute-Upstream`` move."""
    by_name = {s.name: s for s in standins}
    threshold = next((f"the chat route's {round(r.latency_threshold_s * 1000)} ms threshold"
                      for r in config.routes if r.model == "chat"), "the latency threshold")

    def post(names: Sequence[str], ttft: float | None = None) -> list[str]:
        return [f"  curl -s -X POST {by_name[n].control_url} -d "
                f"'{{\"ttft_s\": {by_name[n].behaviour.ttft_s if ttft is None else ttft}}}'"
                for n in names]

    (first, first_servers), (second, second_servers), (third, _) = _CHAT_ORDER
    width = max(len(s.name) for s in standins)
    return "\n".join([
        f"Make an upstream slow ({round(_SLOW_TTFT_S * 1000)} ms to first token, past "
        f"{threshold}) and watch traffic move:",
        "  # in a second terminal: which upstream answers each request",
        f"  while sleep 0.5; do curl -s -o /dev/null -D - {url}/v1/chat/completions \\",
        f"       -H 'Authorization: Bearer {DEMO_KEY}' -H 'Content-Type: application/json' \\",
        f"       -d '{_CHAT_BODY}' | grep -i '^x-skyroute-upstream'; done",
        f"  # {first} answers first; make its servers slow and traffic moves to {second}:",
        *post(first_servers, _SLOW_TTFT_S),
        f"  # then make {second} slow: traffic moves to {third}",
        *post(second_servers, _SLOW_TTFT_S),
        f"  # {third} works the same way. Put them back (traffic returns once the p95 over",
        "  # the last minute is low again, and ramps up gradually):",
        *post((*first_servers, *second_servers)),
        "Stand-in control URLs (GET shows the behaviour, POST changes it: "
        '{"ttft_s": 0.4}, {"mode": "busy"}, {"mode": "error"}, {"mode": "ok"}):',
        *[f"  {s.name:<{width}}  {s.control_url}" for s in standins],
        "Ctrl-C stops everything.",
    ])


def _standins() -> list[StandinUpstream]:
    """The three regions, then the two GPU servers, not started."""
    models = ("deepseek-chat", "text-embedding-3-small")
    standins = [StandinUpstream(name, models=models, api_key=UPSTREAM_KEY,
                                behaviour=Behaviour(ttft_s=ttft, token_delay_s=0.02))
                for name, (_, ttft) in _REGIONS.items()]
    standins += [StandinUpstream(name, models=("deepseek-r1-distill-qwen-7b",),
                                 behaviour=Behaviour(ttft_s=0.015, token_delay_s=0.01),
                                 metrics_format="vllm") for name in _GPU]
    return standins


async def run_demo(*, port: int = 8080, host: str = "127.0.0.1", instances: int = 1,
                   prometheus_bin: str | None = None, ready: asyncio.Event | None = None) -> None:
    """Start the stand-ins and skyroute, print how to try them, serve until stopped.

    With ``instances`` > 1, that many skyroute instances run on consecutive ports
    (or free ones with ``port=0``), peered over state sync. With ``prometheus_bin``
    (see ``find_prometheus``) that Prometheus scrapes them and the GPU stand-ins,
    and every instance reads upstream latency from it.

    Raises:
        PrometheusStartError: Prometheus did not start (nothing is left running).
        StartupError: a port cannot be listened on (nothing is left running).
    """
    standins = _standins()
    env: dict[str, str] = {"DEMO_UPSTREAM_KEY": UPSTREAM_KEY, "SKYROUTE_DEMO_KEY": DEMO_KEY}
    socks: list[socket.socket] = []
    try:
        for i in range(instances):
            socks.append(_bind(host, port + i if port else 0))
        ports = [sock.getsockname()[1] for sock in socks]
        for standin, var in zip(standins, [*[v for v, _ in _REGIONS.values()], *_GPU.values()],
                                strict=True):
            await standin.start(host="127.0.0.1", port=0)
            env[var] = standin.base_url
        async with contextlib.AsyncExitStack() as stack:
            prometheus = None
            if prometheus_bin is not None:
                jobs = {"skyroute": [f"127.0.0.1:{p}" for p in ports],
                        # the cloud regions export no /metrics, as real cloud APIs don't
                        "standin": [f"127.0.0.1:{s.port}" for s in standins if s.metrics_format]}
                prometheus = await stack.enter_async_context(LocalPrometheus(
                    jobs, binary=prometheus_bin, interval_s=PROMETHEUS_INTERVAL_S))
            servers = []
            for index, sock in enumerate(socks):
                text = demo_config_text()
                if instances > 1:
                    text = _instance_config(text, index, ports)
                if prometheus is not None:
                    text = _with_prometheus(text, prometheus.url)
                config = parse_config(text, source="<embedded demo.yaml>", env=env)
                servers.append(await stack.enter_async_context(Server(config, sock=sock)))
            urls = [s.url for s in servers]
            print("\n\n".join([_try_lines(urls[0], urls[1:]),
                                _observe_lines(urls, config, prometheus),
                                _control_lines(urls[0], standins, config)]), flush=True)
            if ready is not None:
                ready.set()
            await _until_stopped()
    finally:
        for sock in socks:
            sock.close()
        for standin in standins:
            with contextlib.suppress(Exception):
                await standin.aclose()


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listen now, not when the server starts: a port another process listens on
        # is refused here, before any stand-in starts.
        sock.listen()
    except OSError as exc:
        sock.close()
        raise listen_error(host, port, exc) from exc
    return sock
