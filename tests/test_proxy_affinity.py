"""Session affinity across two skyroute instances far apart: follow-ups never flip the pin.

The delay line is long (0.5 s one way) so that the follow-ups really do reach the
second instance before the first answer's pin does, however busy the machine is.
"""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import AsyncExitStack

import pytest
from skyroute.proxy import Server
from skyroute.proxy._state import STATE_SYNC
from skyroute.proxy.demo import TcpForwarder
from skyroute.routing import parse_config

from .conftest import client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

MESSAGES = [{"role": "user", "content": "hi"}]
SYNC_TOKEN = "sync-secret-for-tests"
ONE_WAY_DELAY_S = 0.5
FOLLOW_UP_OFFSETS_S = (0.0, 0.001, 0.01, 0.1)
SESSIONS_PER_OFFSET = 20


@pytest.fixture
async def far_pair(standin):
    """Two instances whose sync links cross a 0.5 s delay line; s0 prefers b, s1 prefers a."""
    ups = [await standin(name) for name in ("a", "b")]
    socks = [socket.socket() for _ in range(2)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    lines = [TcpForwarder(s.getsockname()[1], delay_s=ONE_WAY_DELAY_S) for s in socks]
    async with AsyncExitStack() as stack:
        for line in lines:
            await line.start()
            stack.push_async_callback(line.aclose)
        servers = []
        for i, sock in enumerate(socks):
            other = lines[1 - i].port
            order = "[b, a]" if i == 0 else "[a, b]"
            extra = (f"instance:\n  id: s{i}\n"
                     f"sync:\n  token: {SYNC_TOKEN}\n  peers: [ws://127.0.0.1:{other}/sync]\n")
            text = routing_yaml([entry(u) for u in ups],
                                f"- model: chat\n  targets: {order}\n  strategy: priority\n",
                                extra=extra)
            server = Server(parse_config(text, env={}), sock=sock, grace_s=1.0)
            await stack.enter_async_context(server)
            servers.append(server)
        await eventually(lambda: all(
            set(s.app[STATE_SYNC].peer_states().values()) == {"connected"} for s in servers),
            timeout=10)
        yield servers


async def test_follow_ups_at_another_instance_end_on_the_first_upstream(far_pair):
    """Follow-ups at s1 0/1/10/100 ms after s0's first answer all end pinned to s0's upstream."""
    s0, s1 = far_pair
    sessions = [(offset, f"conv-{offset}-{n}")
                for offset in FOLLOW_UP_OFFSETS_S for n in range(SESSIONS_PER_OFFSET)]
    raced: list[str] = []
    async with client_for(s0) as first_client, client_for(s1) as follow_client:

        async def conversation(offset: float, session: str) -> None:
            headers = {"X-Session-ID": session}
            first = await first_client.chat.completions.create(
                model="chat", messages=MESSAGES, extra_headers=headers)
            assert "from b" in first.choices[0].message.content
            await asyncio.sleep(offset)
            follow_up = await follow_client.chat.completions.create(
                model="chat", messages=MESSAGES, extra_headers=headers)
            if "from a" in (follow_up.choices[0].message.content or ""):
                raced.append(session)  # s1 had not seen the pin yet: served by its own choice

        await asyncio.gather(*(conversation(offset, s) for offset, s in sessions))

        def pinned_to_b() -> bool:
            return all(
                (got := server.app[STATE_SYNC].store.get(s, now=time.time())) is not None
                and got.upstream == "b"
                for server in (s0, s1) for _, s in sessions)

        await eventually(pinned_to_b, timeout=10)
        # Those follow-ups really did race the pin (it is 0.5 s away), yet did not move it.
        assert len(raced) >= SESSIONS_PER_OFFSET
        # And the conversations go on where they started, at either instance.
        for _, session in sessions[:: SESSIONS_PER_OFFSET]:
            later = await follow_client.chat.completions.create(
                model="chat", messages=MESSAGES, extra_headers={"X-Session-ID": session})
            assert "from b" in later.choices[0].message.content
