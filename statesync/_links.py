"""WebSocket shells around ``YConnection``: the byte pump and outbound peer links.

Rules / theory of operation
---------------------------
* ``pump`` carries one ``YConnection`` over one WebSocket (inbound or outbound):
  a sender task drains the connection's queue in order; the receive loop feeds
  binary frames in and queues the replies. When the connection moves to CLOSED
  (protocol error, epoch rotation, send-queue overflow) the socket is closed with a
  code that says why (``CLOSE_*``). A slow peer is dropped rather than buffered
  without bound; it catches up with SYNC_STEP1/2 when it reconnects.
* On instance-to-instance connections (both directions) ``pump`` also speaks the
  control frames of ``_control``: it answers pings, pings every
  ``ping_interval_s`` itself, records the peer's links for ``_relay``, and closes a
  link whose peer stayed silent for ``ping_interval_s * ping_misses`` (a black hole
  keeps a TCP connection "open" for minutes). Closing waits at most one ping
  interval for the peer's close frame, then the socket is dropped.
* A ``PeerLink`` is one attempt to talk to one peer about one document:
  CONNECTING -> CONNECTED -> CLOSED, and then it is finished for good. A
  ``LinkSupervisor`` owns the retry policy: it makes a new ``PeerLink`` per attempt,
  waits between attempts as ``routing``'s one backoff generator says (equal jitter,
  ``link_backoff``: 50 ms doubling, capped at ``BACKOFF_CAP_S``) through an injected
  ``sleep``, and reports a ``LinkState`` for ``/health``. An attempt whose handshake
  takes longer than the silence that kills a link fails.
* Handshake: ``GET {peer}/{doc}?epoch=N&instance=WRITER`` with ``Authorization: Bearer``.
  WRITER is the process's writer id (``instance.id`` plus a random suffix), so it
  names this very process: two processes never share it, even when misconfigured
  with the same ``instance.id``. The server answers 409 with ``X-Skyroute-Epoch``
  when its epoch is newer (we rotate to it and reconnect at once; when ours is newer
  the server rotates and accepts), 409 with ``X-Skyroute-Self`` when we dialled
  ourselves (state SELF, never retried) and 401 for a bad token (state
  UNAUTHORIZED, retried with backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, final

import aiohttp
from aiohttp import web
from skyroute.routing import Jitter, Sleep, backoff_delays

from ._control import Liveness, ping_frame, pong_frame, read_control
from ._doc import DocHub
from ._metrics import SyncMetrics, get_logger
from ._protocol import ConnState, YConnection, message_kind
from ._types import LinkState, SyncProtocolError, SyncSettings

CLOSE_ROTATED: Final = 4000
CLOSE_PROTOCOL: Final = 4400
CLOSE_STALE_DOC: Final = 4409
EPOCH_HEADER: Final = "X-Skyroute-Epoch"
SELF_HEADER: Final = "X-Skyroute-Self"
MAX_QUEUED_MESSAGES: Final = 10_000
"""About 50 s of a busy instance's writes; beyond that a resync is cheaper."""
HEARTBEAT_S: Final = 15.0
"""WebSocket ping interval for Yjs clients; instances also ping each other (``_control``)."""
BACKOFF_BASE_S: Final = 0.05
"""A peer restarting or a link rotated is back within milliseconds: redial quickly."""
BACKOFF_CAP_S: Final = 1.0
"""Under 1 s: after a partition heals the link is back (and caught up) within about a
second, and the jitter keeps a fleet redialling one peer from arriving in step."""

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def link_backoff(rng: random.Random) -> Iterator[float]:
    """Delays between attempts to reach one peer: 0.05 s doubling to 1 s, in [d/2, d]."""
    return backoff_delays(base_s=BACKOFF_BASE_S, cap_s=BACKOFF_CAP_S, rng=rng,
                          jitter=Jitter.EQUAL)


async def pump(
    ws: WebSocket,
    hub: DocHub,
    *,
    name: str,
    external: bool,
    metrics: SyncMetrics,
    peer: str | None = None,
    liveness: Liveness | None = None,
) -> YConnection:
    """Run a y-protocols conversation on ``ws`` until either side closes it.

    ``peer`` is the remote process's writer id when known. Between instances the
    server sends one TEXT frame first, the hello (``_control``), so the dialling
    side learns it too; Yjs clients never get one. ``liveness`` (peer connections
    only) turns on pinging and closes the link when the peer falls silent.

    Returns the (CLOSED) connection, whose ``close_reason`` says why it ended.
    """
    queue: asyncio.Queue[bytes | str | None] = asyncio.Queue()

    def on_send(message: bytes | str) -> None:
        if queue.qsize() >= MAX_QUEUED_MESSAGES:
            conn.close("send queue overflow")
        else:
            queue.put_nowait(message)

    conn = YConnection(
        hub,
        name=name,
        external=external,
        on_send=on_send,
        on_close=lambda: queue.put_nowait(None),
    )
    conn.peer = peer
    if not external:
        conn.peer_epoch = hub.doc.epoch  # the handshake settled on one epoch
        # The dialler said ?ping=1: it speaks the control frames, in-band rotation included.
        conn.rotates_in_band = liveness is not None and liveness.is_armed
    for message in conn.initial_messages():
        queue.put_nowait(message)
    hub.attach(conn)
    sender = asyncio.create_task(_send_loop(ws, conn, queue, metrics))
    tasks = [asyncio.create_task(_receive_loop(ws, conn, hub, metrics, liveness))]
    if liveness is not None:
        tasks.append(asyncio.create_task(_ping_loop(conn, liveness, metrics)))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # Before any await: a handler cancelled here (its client went away) must not
        # leave a dead connection attached to the hub.
        hub.detach(conn)
        conn.close("socket closed")
        await asyncio.gather(*tasks, return_exceptions=True)
        # asyncio.wait, not wait_for: on 3.11 wait_for can swallow our own cancellation.
        # A silent peer will not answer our close frame: do not wait for it.
        silent = liveness is not None and liveness.is_dead(now=asyncio.get_running_loop().time())
        await asyncio.wait([sender], timeout=0.0 if silent else _close_wait_s(liveness))
        sender.cancel()
    return conn


def _close_wait_s(liveness: Liveness | None) -> float:
    return liveness.interval_s if liveness is not None else 5.0


async def _receive_loop(
    ws: WebSocket, conn: YConnection, hub: DocHub, metrics: SyncMetrics, live: Liveness | None
) -> None:
    log = get_logger().bind(peer=conn.name, doc=hub.name)
    loop = asyncio.get_running_loop()
    async for frame in ws:
        if live is not None:
            live.on_frame(now=loop.time())
        if frame.type is aiohttp.WSMsgType.TEXT and not conn.external:
            metrics.count_message("in", "control", len(frame.data))
            _on_control(frame.data, conn, hub, metrics, live, now=loop.time())
            continue
        if frame.type is not aiohttp.WSMsgType.BINARY:
            continue  # y-websocket sends only binary frames; pings are handled below us
        data: bytes = frame.data
        metrics.count_message("in", message_kind(data), len(data))
        try:
            hub.receive(conn, data)  # sent before the peer rotated: see DocHub.receive
        except SyncProtocolError as exc:
            log.warning("sync_message_rejected", error=str(exc))
            return
        if conn.state is ConnState.CLOSED:
            return


def _on_control(
    data: str,
    conn: YConnection,
    hub: DocHub,
    metrics: SyncMetrics,
    live: Liveness | None,
    *,
    now: float,
) -> None:
    control = read_control(data)
    if control is None:
        return
    if control.instance is not None and conn.peer is None:
        conn.peer = control.instance
        hub.on_peer_identified(conn)
    if control.ping is not None:
        conn.push_control(pong_frame(control.ping))
    if live is not None and (control.speaks_ping or control.ping is not None):
        live.arm()
    if control.pong is not None and live is not None:
        rtt = live.on_pong(control.pong, now=now)
        if rtt is not None:
            metrics.ping_seconds.observe(rtt)
    if control.speaks_ping:
        conn.rotates_in_band = True
    if control.links is not None:
        hub.on_peer_links(conn, control.links)
    if control.ahead is not None:
        hub.receive_ahead(conn, *control.ahead)
    if control.epoch is not None:
        hub.on_peer_epoch(conn, control.epoch)


async def _ping_loop(conn: YConnection, live: Liveness, metrics: SyncMetrics) -> None:
    """Ping every interval; return (closing ``conn``) once the peer is silent too long."""
    loop = asyncio.get_running_loop()
    next_ping = loop.time()
    while conn.state is ConnState.OPEN:
        now = loop.time()
        if live.is_dead(now=now):
            metrics.links_silent.inc()
            get_logger().warning(
                "sync_peer_silent", peer=conn.name, seconds=round(live.dead_after_s, 3),
                hint="no frame from the peer for that long: the link is cut and redialled",
            )
            conn.close(f"peer silent for {live.dead_after_s:g}s")
            return
        if now >= next_ping:
            conn.push_control(ping_frame(live.next_ping(now=now)))
            next_ping = now + live.interval_s
        # Wake for the next ping or the moment silence would kill the link, whichever
        # is first: a cut shows at interval x misses, not up to one interval later.
        await asyncio.sleep(max(0.001, min(next_ping - now, live.seconds_left(now=now))))


async def _send_loop(
    ws: WebSocket, conn: YConnection, queue: asyncio.Queue[bytes | str | None],
    metrics: SyncMetrics,
) -> None:
    try:
        while (message := await queue.get()) is not None:
            if isinstance(message, str):
                await ws.send_str(message)
                metrics.count_message("out", "control", len(message))
            else:
                await ws.send_bytes(message)
                metrics.count_message("out", message_kind(message), len(message))
    except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
        conn.close(f"send failed: {exc!r}")
    reason = conn.close_reason or ""
    code = (
        CLOSE_ROTATED
        if reason == "epoch rotated"
        else CLOSE_STALE_DOC
        if "older epoch" in reason
        else CLOSE_PROTOCOL
        if reason.startswith("bad")
        else aiohttp.WSCloseCode.OK
    )
    with contextlib.suppress(Exception):
        await ws.close(code=code, message=reason.encode()[:120])


@final
class PeerLink:
    """One connection attempt to one peer for one document; terminal once CLOSED."""

    def __init__(self, url: str, hub: DocHub) -> None:
        self.url = url
        self.hub = hub
        self.state = LinkState.CONNECTING
        self.close_reason: str | None = None

    def __repr__(self) -> str:
        return f"<PeerLink {self.url} {self.state.name}>"

    async def run(
        self,
        session: aiohttp.ClientSession,
        *,
        headers: dict[str, str],
        params: dict[str, str],
        metrics: SyncMetrics,
        settings: SyncSettings,
    ) -> None:
        """Connect and pump until the link ends; never called twice.

        The handshake may take as long as the silence that kills a link
        (``settings.dead_after_s``); closing waits one ping interval for the peer.

        Raises:
            aiohttp.WSServerHandshakeError: the peer refused the upgrade.
            aiohttp.ClientError, TimeoutError, OSError: the peer is unreachable.
        """
        if self.state is not LinkState.CONNECTING:
            raise RuntimeError(f"run() called on a finished link ({self.state.name})")
        interval = settings.ping_interval_s
        try:
            async with asyncio.timeout(settings.dead_after_s):
                ws = await session.ws_connect(
                    self.url,
                    headers=headers,
                    params={**params, "ping": "1"},
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=interval),
                    max_msg_size=64 * 1024 * 1024,
                )
            self.state = LinkState.CONNECTED
            metrics.peers_connected.inc()
            live = Liveness(
                interval_s=interval,
                misses=settings.ping_misses,
                now=asyncio.get_running_loop().time(),
            )
            try:
                conn = await pump(
                    ws, self.hub, name=self.url, external=False, metrics=metrics, liveness=live
                )
                self.close_reason = conn.close_reason
                if ws.close_code == CLOSE_ROTATED:
                    self.close_reason = "epoch rotated"
            finally:
                self.state = LinkState.CLOSED  # before the close handshake: /health is prompt
                metrics.peers_connected.dec()
                with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
                    async with asyncio.timeout(interval):
                        await ws.close()
        finally:
            self.state = LinkState.CLOSED


@final
class LinkSupervisor:
    """Keeps one peer link alive for one document, replacing it after each failure."""

    def __init__(
        self,
        *,
        base_url: str,
        hub: DocHub,
        settings: SyncSettings,
        writer_id: str,
        session: aiohttp.ClientSession,
        metrics: SyncMetrics,
        epoch: Callable[[], int],
        on_peer_epoch: Callable[[int], Awaitable[None]],
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """Args (besides the link's own): ``sleep`` waits out each backoff delay and
        ``rng`` draws their jitter (a seeded one makes the delays reproducible)."""
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/{hub.name}"
        self._hub = hub
        self._settings = settings
        self._writer_id = writer_id
        self._session = session
        self._metrics = metrics
        self._epoch = epoch
        self._on_peer_epoch = on_peer_epoch
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._state = LinkState.CONNECTING
        self.link: PeerLink | None = None
        self._task: asyncio.Task[None] | None = None
        self._log = get_logger().bind(peer=self.url, doc=hub.name)

    def __repr__(self) -> str:
        return f"<LinkSupervisor {self.url} {self.state.name}>"

    @property
    def state(self) -> LinkState:
        """CONNECTED while the current link is; otherwise what the retry loop is doing."""
        if self.link is not None and self.link.state is LinkState.CONNECTED:
            return LinkState.CONNECTED
        return self._state

    def start(self) -> None:
        """Start the reconnect loop as a task."""
        if self._task is not None:
            raise RuntimeError("start() called twice")
        self._task = asyncio.create_task(self._run(), name=f"statesync-link {self.url}")

    async def aclose(self) -> None:
        """Stop the loop and close the current link; the state becomes CLOSED."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._state = LinkState.CLOSED

    async def _run(self) -> None:
        delays = link_backoff(self._rng)
        token = self._settings.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        while True:
            self._state = LinkState.CONNECTING
            self.link = PeerLink(self.url, self._hub)
            params = {"epoch": str(self._epoch()), "instance": self._writer_id}
            retry_now = False
            try:
                await self.link.run(
                    self._session,
                    headers=headers,
                    params=params,
                    metrics=self._metrics,
                    settings=self._settings,
                )
                delays = link_backoff(self._rng)  # it connected: start the backoff afresh
                retry_now = self.link.close_reason == "epoch rotated"
                self._log.info("sync_peer_disconnected", reason=self.link.close_reason)
            except aiohttp.WSServerHandshakeError as exc:
                retry_now = await self._on_refused(exc)
                if self._state is LinkState.SELF:
                    return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._log.debug("sync_peer_connect_failed", error=repr(exc))
            if not retry_now:
                if self._state is not LinkState.UNAUTHORIZED:
                    self._state = LinkState.BACKOFF
                await self._sleep(next(delays))

    async def _on_refused(self, exc: aiohttp.WSServerHandshakeError) -> bool:
        headers: Any = exc.headers or {}
        if exc.status == 409 and headers.get(SELF_HEADER):
            self._state = LinkState.SELF
            self._log.info("sync_peer_parked", reason="this address is this instance itself")
            return False
        if exc.status == 409 and headers.get(EPOCH_HEADER, "").isdigit():
            theirs = int(headers[EPOCH_HEADER])
            if theirs <= self._epoch():
                return False  # we moved on meanwhile; the next attempt carries our epoch
            self._log.info("sync_epoch_adopted", epoch=theirs)
            await self._on_peer_epoch(theirs)
            return True
        if exc.status == 401:
            self._state = LinkState.UNAUTHORIZED
            self._log.warning("sync_peer_refused", status=exc.status,
                              hint="the peer's sync.token differs from this instance's")
            return False
        self._log.warning("sync_peer_refused", status=exc.status)
        return False
