"""DNS discovery of peer instances (``sync.discovery: dns:name[:port]``).

Rules / theory of operation
---------------------------
* Every ``interval_s`` the name is resolved through the system resolver (A and
  AAAA records), each lookup bounded by ``LOOKUP_TIMEOUT_S``. Every address in the
  answer becomes a peer base URL ``ws://address:port/sync``. The whole answer is
  handed to ``on_answer``, which adds the new peers and drops the ones that left
  it, so a replaced Kubernetes pod's old address does not linger as a link in
  backoff forever.
* A failed lookup (name not found, resolver down, timeout) changes nothing: the
  peers already found keep their links, the failure is logged and counted, and the
  next round tries again. Discovery never ends on its own.
* Our own address is in the answer (a headless Service lists every pod, this one
  included) and is *not* filtered here: an address cannot tell this process from
  another one on the same host (the demo, several instances per node). The link
  to it is refused by the handshake instead: ``?instance=`` carries this process's
  writer id, the server recognises it and answers 409 ``X-Skyroute-Self``, and the
  link parks in state SELF (see ``_links``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Final, final

from ._metrics import SyncMetrics, get_logger

LOOKUP_TIMEOUT_S: Final = 5.0
"""A resolver that has not answered in 5 s is down; the next round tries again."""

Resolve = Callable[[str, int], Awaitable[set[str]]]
"""``(host, port) -> addresses``; raises ``OSError`` or ``TimeoutError`` on failure."""


async def resolve_addresses(host: str, port: int) -> set[str]:
    """Every address ``host`` resolves to (A and AAAA), through the system resolver.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``).
        TimeoutError: no answer within ``LOOKUP_TIMEOUT_S``.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(LOOKUP_TIMEOUT_S):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {str(info[4][0]) for info in infos}


def peer_url(address: str, port: int) -> str:
    """The peer base URL for one discovered address (IPv6 in brackets)."""
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"ws://{host}:{port}/sync"


@final
class DnsDiscovery:
    """Resolves one name periodically and reports the peer URLs it names."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        interval_s: float,
        resolve: Resolve,
        on_answer: Callable[[set[str]], Awaitable[None]],
        metrics: SyncMetrics,
        instance_id: str,
    ) -> None:
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self._resolve = resolve
        self._on_answer = on_answer
        self._metrics = metrics
        self._log = get_logger().bind(instance=instance_id, target=f"{host}:{port}")
        self.last_answer: set[str] | None = None

    def __repr__(self) -> str:
        return f"<DnsDiscovery {self.host}:{self.port} every={self.interval_s}s>"

    async def run(self) -> None:
        """Look up, report, sleep ``interval_s``; repeat until cancelled."""
        while True:
            await self.lookup_once()
            await asyncio.sleep(self.interval_s)

    async def lookup_once(self) -> set[str] | None:
        """One lookup; returns the peer URLs found, or None when the lookup failed."""
        try:
            addresses = await self._resolve(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self._metrics.discovery_lookups.labels("failed").inc()
            self._log.warning(
                "sync_discovery_failed",
                error=str(exc) or f"no answer within {LOOKUP_TIMEOUT_S} s",
                retry_in_s=self.interval_s,
                hint="sync.discovery must name a resolvable host, e.g. the headless "
                "Service dns:<service>.<namespace>.svc.cluster.local[:port]",
            )
            return None
        self._metrics.discovery_lookups.labels("ok").inc()
        self._metrics.discovered_peers.set(len(addresses))
        urls = set()
        for address in addresses:
            try:
                urls.add(peer_url(address, self.port))
            except ValueError:  # a resolver answer that is not an IP address: skip it
                self._log.warning("sync_discovery_address_skipped", address=address)
        if urls != self.last_answer:
            before = self.last_answer or set()
            self._log.info(
                "sync_discovery_changed",
                added=sorted(urls - before),
                removed=sorted(before - urls),
            )
        self.last_answer = urls
        await self._on_answer(urls)
        return urls
