"""WebSocket shells around ``YConnection``: the byte pump and outbound peer links.

Rules / theory of operation
---------------------------
* ``pump`` carries one ``YConnection`` over one WebSocket (inbound or outbound):
  a sender task drains the connection's queue in order; the receive loop feeds
  binary frames in and queues the replies. When the connection moves to CLOSED
  (protocol error, epoch rotation, send-queue overflow) the socket is closed with a
  code that says why (``CLOSE_*``). A slow peer is dropped rather than buffered
  without bound; it catches up with SYNC_STEP1/2 when it reconnects.
* A ``PeerLink`` is one attempt to talk to one peer about one document:
  CONNECTING -> CONNECTED -> CLOSED, and then it is finished for good. A
  ``LinkSupervisor`` owns the retry policy: it makes a new ``PeerLink`` per attempt,
  waits between attempts as ``routing``'s one backoff generator says (equal jitter,
  ``link_backoff``) through an injected ``sleep``, and reports a ``LinkState`` for
  ``/health``.
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
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, final

import aiohttp
from aiohttp import web
from skyroute.routing import Jitter, Sleep, backoff_delays

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
CONNECT_TIMEOUT_S: Final = 5.0
HEARTBEAT_S: Final = 15.0
"""WebSocket ping interval: a silently dead peer is noticed within ~2 heartbeats."""
BACKOFF_BASE_S: Final = 0.05
"""A peer restarting or a link rotated is back within milliseconds: redial quickly."""
BACKOFF_CAP_S: Final = 5.0
"""A peer that stays away is redialled every 2.5-5 s: cheap, and back soon after it is."""

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def link_backoff(rng: random.Random) -> Iterator[float]:
    """Delays between attempts to reach one peer: 0.05 s doubling to 5 s, in [d/2, d]."""
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
) -> YConnection:
    """Run a y-protocols conversation on ``ws`` until either side closes it.

    ``peer`` is the remote process's writer id when known. Between instances the
    server sends one TEXT frame first, ``{"instance": writer id}`` (the hello), so the
    dialling side learns it too; Yjs clients never get one.

    Returns the (CLOSED) connection, whose ``close_reason`` says why it ended.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def on_send(message: bytes) -> None:
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
    log = get_logger().bind(peer=name, doc=hub.name)
    for message in conn.initial_messages():
        queue.put_nowait(message)
    hub.attach(conn)
    sender = asyncio.create_task(_send_loop(ws, conn, queue, metrics))
    try:
        async for frame in ws:
            if frame.type is aiohttp.WSMsgType.TEXT and not external:
                conn.peer = _read_hello(frame.data) or conn.peer
                continue
            if frame.type is not aiohttp.WSMsgType.BINARY:
                continue  # y-websocket sends only binary frames; pings are handled below us
            data: bytes = frame.data
            metrics.count_message("in", message_kind(data), len(data))
            try:
                for reply in conn.receive_message(data):
                    queue.put_nowait(reply)
            except SyncProtocolError as exc:
                log.warning("sync_message_rejected", error=str(exc))
                break
            if conn.state is ConnState.CLOSED:
                break
    finally:
        hub.detach(conn)
        conn.close("socket closed")
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(sender, timeout=CONNECT_TIMEOUT_S)
        sender.cancel()
    return conn


def hello_frame(writer_id: str) -> str:
    """The TEXT frame a server sends first on a peer (instance-to-instance) connection."""
    return json.dumps({"instance": writer_id})


def _read_hello(data: str) -> str | None:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        instance = json.loads(data).get("instance")
        return instance if isinstance(instance, str) else None
    return None


async def _send_loop(
    ws: WebSocket, conn: YConnection, queue: asyncio.Queue[bytes | None], metrics: SyncMetrics
) -> None:
    try:
        while (message := await queue.get()) is not None:
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
    ) -> None:
        """Connect and pump until the link ends; never called twice.

        Raises:
            aiohttp.WSServerHandshakeError: the peer refused the upgrade.
            aiohttp.ClientError, TimeoutError, OSError: the peer is unreachable.
        """
        if self.state is not LinkState.CONNECTING:
            raise RuntimeError(f"run() called on a finished link ({self.state.name})")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                ws = await session.ws_connect(
                    self.url,
                    headers=headers,
                    params=params,
                    heartbeat=HEARTBEAT_S,
                    max_msg_size=64 * 1024 * 1024,
                )
            self.state = LinkState.CONNECTED
            metrics.peers_connected.inc()
            try:
                conn = await pump(ws, self.hub, name=self.url, external=False, metrics=metrics)
                self.close_reason = conn.close_reason
                if ws.close_code == CLOSE_ROTATED:
                    self.close_reason = "epoch rotated"
            finally:
                metrics.peers_connected.dec()
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
                    self._session, headers=headers, params=params, metrics=self._metrics
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
