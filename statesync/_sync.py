"""``StateSync``: the object ``proxy/`` builds, mounts and starts.

Rules / theory of operation
---------------------------
* One ``DocHub`` per document name; ``store`` (a ``SessionStore``) reads and writes
  them, and ``objects`` (an ``ObjectDirectory``) the object id -> upstream map.
  Inbound Yjs connections arrive on ``GET /sync/{doc}``; outbound links are
  one ``LinkSupervisor`` per (peer, document), from ``settings.peers`` and DNS
  discovery (``_discovery``: peers that leave the DNS answer are dropped; static
  peers never are). With ``settings.relay_url`` (fleet mode) there are no peer
  links: one ``RelayLink`` per document joins it to a Redis engine instead
  (``_redis_relay``). Both are ``Transport``s: ``/health`` shows either. The peer
  identity on the wire is the writer id, unique per process: a link that
  reaches this very process (our own pod IP in the headless Service's answer)
  is refused with 409 ``X-Skyroute-Self`` and parks as SELF.
* Auth happens before the upgrade: ``Authorization: Bearer <token>`` or
  ``?token=<token>`` (what y-websocket's ``params`` sends), compared in constant
  time. Anything else is 401, counted and logged with the peer address, never the
  token. With ``token=None`` every inbound connection is refused.
* Epochs: ``epoch = floor(wall_clock / rotate_every_s)``, and it only moves forward.
  A peer link states its epoch in the handshake (``?epoch=N``). The side with the
  older epoch rotates to the newer one (the server at once, the client after a 409
  carrying ``X-Skyroute-Epoch``), so the cluster converges on the highest epoch
  even with skewed clocks. Rotating rebuilds each document from its live entries.
  The clock-driven rotation builds epoch N's documents in slices from the moment N
  starts and installs them ``INSTALL_AFTER_S`` later, the same moment on every
  instance (``_rotation``: settled entries become identical items everywhere, recent
  ones come from their writer). Peer links that speak the control frames stay open:
  the rotating side sends ``{"epoch": N}``, its own part and a SYNC_STEP1 on each, a
  peer still in an older epoch finishes its build on that frame, and SYNC_STEP1/2
  brings whatever else differs without a reconnect (see ``DocHub.install``).
  Other connections (Yjs clients, older instances) are closed
  and reconnect. Updates are never exchanged between different epochs: one a peer
  sent just before it rotated, which arrives after we did, is applied to the previous
  document and its entries written into the new one on receipt (``DocHub.receive``),
  so a write in flight at the switch does not wait for its writer's part. Clients
  without ``?epoch`` (a Yjs app) get the current epoch; one that comes back holding
  an older document is refused with close code 4409 and must start a fresh ``Y.Doc``.
* Snapshot (optional): every ``SNAPSHOT_EVERY_S`` and at ``aclose`` the documents
  are written atomically to ``snapshot_path``; ``start`` loads it (same epoch: as
  is; older epoch: rebuilt into the current one) before any link is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from skyroute.routing import Sleep

from ._control import Liveness, hello_frame
from ._discovery import DnsDiscovery, Resolve, resolve_addresses
from ._doc import DocHub, EpochDoc, decode_snapshot, encode_snapshot, load_update, rebuild
from ._links import (
    EPOCH_HEADER,
    HEARTBEAT_S,
    SELF_HEADER,
    LinkSupervisor,
    pump,
)
from ._metrics import SyncMetrics, get_logger
from ._objects import ObjectDirectory
from ._rotation import SLICE_S, Carry, EpochBuilder
from ._store import SessionStore, run_flush_loop
from ._transport import Transport
from ._types import DOC_NAMES, Clock, SnapshotError, SyncSettings

if TYPE_CHECKING:
    from ._redis_relay import RedisRelay

SNAPSHOT_EVERY_S: Final = 10.0
HEARTBEAT_EVERY_S: Final = 1.0
"""Idle instances still heartbeat, so ``skyroute_sync_lag_seconds`` keeps moving."""
SIZE_METRIC_EVERY_S: Final = 5.0
BUILD_PAUSE_S: Final = 0.005
"""A build rests this long after each slice, so peers and writes are served between."""
SLICE_MAX_S: Final = 0.02
"""The longest slice, when a build is late."""
SEND_AHEAD_S: Final = 0.6
"""Each instance sends its own part of the document it builds this long before the install
(once its build is done): peers integrate it then, and at the install only what was written
since crosses the wire. Late enough that little is written after it, early enough that its
arrival (a delay of up to a few hundred ms) is dealt with before every instance switches."""
INSTALL_AFTER_S: Final = 2.0
"""Instances install a new epoch this long after it starts by the clock (at most a quarter
of ``rotate_every_s``): time to build it in slices (one not done by then is finished at
once)."""
OVERLAP_MAX_S: Final = 10.0
"""A rotation's overlap ends after this even if a peer never answered in the new epoch."""
SIZE_MEASURE_SHARE: Final = 0.01
"""Measuring a document encodes all of it on the event loop (0.1-0.3 s at 100,000 sessions,
``bench/sessions.py``): it is done every ``SIZE_METRIC_EVERY_S`` at most, and less often
when it is slow, so that it takes at most this share of the time."""
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


@final
class StateSync:
    """Shared session state for one instance: documents, peer links and the store."""

    def __init__(
        self,
        settings: SyncSettings,
        *,
        registry: CollectorRegistry,
        clock: Clock = time.time,
        resolve: Resolve = resolve_addresses,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """Build the documents and the store; nothing runs until ``start``.

        Args:
            settings: this instance's sync settings.
            registry: where the ``skyroute_sync_*`` metrics are registered.
            clock: wall-clock epoch seconds (epochs, TTLs, heartbeats).
            resolve: the DNS lookup behind ``settings.discovery``; the system resolver
                unless a test stands in for the DNS server.
            sleep: what peer links wait through between attempts to reconnect.
        """
        self.settings = settings
        self._clock = clock
        self._resolve = resolve
        self._sleep = sleep
        self._metrics = SyncMetrics(registry)
        self._log = get_logger().bind(instance=settings.instance_id)
        self.writer_id = f"{settings.instance_id}.{secrets.token_hex(3)}"
        self.epoch = self._epoch_at(clock())
        self._metrics.epoch.set(self.epoch)
        self._hubs = {
            name: DocHub(
                EpochDoc(name, self.epoch),
                metrics=self._metrics,
                max_value_bytes=settings.max_value_bytes,
                max_document_bytes=settings.max_document_bytes,
            )
            for name in DOC_NAMES
        }
        for hub in self._hubs.values():
            hub.on_epoch_request = self._rotate_to  # a peer rotated in-band ahead of us
        self.store = SessionStore(
            settings=settings,
            writer_id=self.writer_id,
            sessions=self._hubs["sessions"],
            usage=self._hubs["usage"],
            clock=clock,
            metrics=self._metrics,
        )
        self.objects = ObjectDirectory(
            self._hubs["sessions"], writer_id=self.writer_id, metrics=self._metrics
        )
        self._links: dict[str, list[Transport]] = {}
        self._relay: RedisRelay | None = None
        self._discovered: set[str] = set()
        self._inbound: set[web.WebSocketResponse] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._started = self._closed = self._paused = False
        self._building: tuple[int, float, dict[str, EpochBuilder]] | None = None
        """(epoch, started at, builder per document) while a rotation is being built."""
        self._rotated_at = clock()

    def __repr__(self) -> str:
        return f"<StateSync {self.writer_id} epoch={self.epoch} peers={len(self._links)}>"

    # -- lifecycle -------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Mount ``GET /sync/{doc}`` (the y-websocket endpoint) on ``app``."""
        app.router.add_get("/sync/{doc}", self._handle)

    async def start(self) -> None:
        """Load the snapshot, then start peer links, flushing, rotation and discovery.

        Raises:
            RuntimeError: called twice or after ``aclose``.
        """
        if self._started or self._closed:
            raise RuntimeError("start() called twice or after aclose()")
        self._started = True
        await self._load_snapshot()
        self._session = aiohttp.ClientSession()
        for peer in self.settings.peers:
            self._add_peer(peer)
        if self.settings.relay_url is not None:
            # Imported here: redis-py is ~6 MiB of RSS that an instance without a relay skips.
            from ._redis_relay import RedisRelay

            self._relay = RedisRelay(self.settings, writer_id=self.writer_id,
                                     metrics=self._metrics, on_peer_epoch=self._on_peer_epoch,
                                     sleep=self._sleep)
            self._add_relay()
        self._spawn(run_flush_loop(self.store, self.settings.flush_interval_s, HEARTBEAT_EVERY_S))
        self._spawn(self._rotation_loop())
        self._spawn(self._size_loop())
        if self.settings.snapshot_path:
            self._spawn(self._snapshot_loop())
        target = self.settings.discovery_target()
        if target is not None:
            discovery = DnsDiscovery(
                host=target[0],
                port=target[1],
                interval_s=self.settings.discovery_interval_s,
                resolve=self._resolve,
                on_answer=self._on_discovered,
                metrics=self._metrics,
                instance_id=self.settings.instance_id,
            )
            self._spawn(discovery.run())

    async def aclose(self) -> None:
        """Flush, snapshot, and close every link and inbound connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._abandon_build()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(s.aclose() for sups in self._links.values() for s in sups))
        if self._relay is not None:
            await self._relay.aclose()
        self.store.flush()
        for hub in self._hubs.values():
            for conn in list(hub.connections):
                conn.close("server shutting down")
        for ws in list(self._inbound):
            with contextlib.suppress(Exception):
                await ws.close()
        if self.settings.snapshot_path and self._started:
            await self._write_snapshot()
        if self._session is not None:
            await self._session.close()

    def peer_states(self) -> dict[str, str]:
        """Link state per peer document URL, e.g. ``{"ws://h:8080/sync/sessions": "connected"}``."""
        return {s.url: s.state.value for sups in self._links.values() for s in sups}

    def document_sizes(self) -> dict[str, int]:
        """Encoded size in bytes of each current document (benchmark, metrics)."""
        return {name: len(hub.doc.full_update()) for name, hub in self._hubs.items()}

    def inbound_connections(self) -> int:
        """Number of inbound sync connections open now."""
        return len(self._inbound)

    async def rotate(self, epoch: int | None = None) -> None:
        """Rotate every document into ``epoch`` (default: the next one) now."""
        self._rotate_to(epoch if epoch is not None else self.epoch + 1)

    async def disconnect_peers(self) -> None:
        """Cut this instance off: close all links and refuse inbound sync until ``connect_peers``.

        Local reads and writes keep working; peers catch up after the heal.
        """
        self._paused = True
        sups = [s for group in self._links.values() for s in group]
        self._links.clear()
        await asyncio.gather(*(s.aclose() for s in sups))
        for ws in list(self._inbound):
            await ws.close()

    def connect_peers(self) -> None:
        """Accept inbound sync again and re-open links to the configured and discovered peers."""
        self._paused = False
        for peer in (*self.settings.peers, *sorted(self._discovered)):
            self._add_peer(peer)
        self._add_relay()

    # -- inbound ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        doc = request.match_info["doc"]
        refusal = self._refusal(request, doc)
        if refusal is not None:
            return refusal
        hub = self._hubs[doc]
        log = self._log.bind(peer=request.remote, doc=doc)
        instance = request.query.get("instance")  # the dialling process's writer id
        interval = self.settings.ping_interval_s
        ws = web.WebSocketResponse(
            heartbeat=HEARTBEAT_S if instance is None else None,
            timeout=interval if instance is not None else 10.0,  # close handshake wait
            max_msg_size=MAX_MESSAGE_BYTES,
        )
        await ws.prepare(request)
        self._inbound.add(ws)
        try:
            live = None
            if instance is not None:
                await ws.send_str(hello_frame(self.writer_id))
                live = Liveness(
                    interval_s=interval,
                    misses=self.settings.ping_misses,
                    now=asyncio.get_running_loop().time(),
                    armed=request.query.get("ping") == "1",
                )
            conn = await pump(
                ws,
                hub,
                name=f"{instance or 'client'}@{request.remote}",
                external=instance is None,
                metrics=self._metrics,
                peer=instance,
                liveness=live,
            )
            log.info("sync_connection_closed", reason=conn.close_reason)
        finally:
            self._inbound.discard(ws)
        return ws

    def _refusal(self, request: web.Request, doc: str) -> web.Response | None:
        """The answer to a sync request that must not be upgraded, or None to accept it.

        A peer stating a newer epoch makes this instance rotate to it first (and accept).
        Refusals are returned, not raised: the app's error middleware rewrites raised
        HTTP errors into OpenAI-shaped API errors with its own messages (a raised 404
        would say "the OpenAI API is under /v1").
        """
        if doc not in self._hubs:
            known = ", ".join(self._hubs)
            return _refuse(404, f"no sync document {doc!r}; /sync/{{doc}} serves {known}")
        log = self._log.bind(peer=request.remote, doc=doc)
        if not self._token_ok(request):
            self._metrics.auth_failures.inc()
            log.warning("sync_auth_refused", has_token=self._presented_token(request) is not None)
            return _refuse(
                401,
                "sync token missing or wrong: send this deployment's sync.token as "
                "'Authorization: Bearer <token>' or as the 'token' query parameter",
            )
        if self._closed or self._paused:
            return _refuse(503, "sync is paused or shutting down here; retry with backoff")
        instance = request.query.get("instance")
        theirs = request.query.get("epoch", "")
        bad = _bad_query(instance, theirs)
        if bad is not None:
            return _refuse(400, bad)
        if instance == self.writer_id:
            return _refuse(409, "this address is the dialling instance itself", SELF_HEADER, "1")
        if instance is not None and instance.rpartition(".")[0] == self.settings.instance_id:
            log.warning(
                "sync_instance_id_duplicated",
                peer_writer=instance,
                hint="another running process has the same instance.id; give each its own "
                "so logs, metrics and health gossip can tell them apart",
            )
        if theirs and int(theirs) > self.epoch:
            self._rotate_to(int(theirs))
        elif theirs and int(theirs) < self.epoch:
            return _refuse(
                409,
                f"epoch {theirs} is older than this instance's {self.epoch}: "
                "rotate to it and reconnect",
                EPOCH_HEADER,
                str(self.epoch),
            )
        return None

    @staticmethod
    def _presented_token(request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.query.get("token")

    def _token_ok(self, request: web.Request) -> bool:
        expected, given = self.settings.token, self._presented_token(request)
        if expected is None or given is None:
            return False
        return hmac.compare_digest(given.encode(), expected.encode())

    # -- epochs ----------------------------------------------------------------------

    def _epoch_at(self, now: float) -> int:
        return math.floor(now / self.settings.rotate_every_s)

    def _rotate_to(self, epoch: int) -> None:
        """Rotate every document into ``epoch`` now, or (on any error) none of them.

        A build into that epoch already under way (``_rotation_loop``) is finished at
        once; any other is abandoned and this one done in one go. The new documents
        are all built before any is installed; a failure is logged and counted, and
        the old epoch keeps serving (the next rotation check tries again).
        """
        if epoch <= self.epoch:
            return
        if self._building is not None and self._building[0] != epoch:
            self._abandon_build()
        if self._building is None:
            self._start_build(epoch)
        self._finish_build()

    def _start_build(self, epoch: int) -> None:
        """Start building every document of ``epoch`` beside the current ones."""
        self.store.flush()
        now = self._clock()
        start = min(epoch * self.settings.rotate_every_s, now)
        builders = {}
        for name, hub in self._hubs.items():
            rules = self.store.carry_rules(start=start, linked=hub.linked_peers())
            builders[name] = EpochBuilder(hub.doc, hub.prepare(epoch), rules)
        self._building = (epoch, time.perf_counter(), builders)

    def _abandon_build(self) -> None:
        if self._building is not None:
            for builder in self._building[2].values():
                builder.cancel()
            self._building = None

    def _finish_build(self) -> None:
        """Finish the build under way and install its documents."""
        assert self._building is not None
        epoch, started, builders = self._building
        self._building = None
        try:
            rebuilt = {name: builder.finish() for name, builder in builders.items()}
        except Exception as exc:
            self._metrics.rotation_failures.inc()
            self._log.error("sync_rotation_failed", epoch=self.epoch, to_epoch=epoch,
                            error=repr(exc)[:200])
            return
        self.epoch = epoch
        for name, hub in self._hubs.items():
            hub.install(rebuilt[name], left=builders[name].left)
        self._rotated_at = self._clock()
        self.store.heartbeat()
        self._metrics.epoch.set(epoch)
        self._metrics.rotations.inc()
        counts = {how.value: sum(b.counts[how] for b in builders.values()) for how in Carry}
        for how, count in counts.items():
            self._metrics.rotation_entries.labels(how).inc(count)
        if self.settings.is_shared:
            self._log.info("sync_rotated", epoch=epoch,
                           seconds=round(time.perf_counter() - started, 4), **counts)

    async def _on_peer_epoch(self, epoch: int) -> None:
        self._rotate_to(epoch)

    async def _rotation_loop(self) -> None:
        while True:
            due = (self.epoch + 1) * self.settings.rotate_every_s - self._clock()
            await asyncio.sleep(min(max(due, 0.0), 1.0))
            self._end_overlap_if_late()
            epoch = self._epoch_at(self._clock())
            if epoch <= self.epoch:
                continue
            # Build beside the live documents, a slice per turn of the event loop, so
            # writes and peers are served meanwhile; a peer's {"epoch": N} may finish it.
            # Every instance installs at the same moment by the clock (not when its own
            # build is done), so nobody is in the new epoch while another still writes
            # in the old one.
            self._start_build(epoch)
            period = self.settings.rotate_every_s
            install_at = epoch * period + min(INSTALL_AFTER_S, period / 4)
            loop = asyncio.get_running_loop()
            last_turn = loop.time()
            while self._building is not None and self._building[0] == epoch:
                left_s = install_at - self._clock()
                if left_s <= 0:
                    self._finish_build()
                    break
                # Each slice gets what keeps the build on time over the turns of the loop
                # still to come (a busy loop turns slowly), at least SLICE_S.
                turn_s, last_turn = max(loop.time() - last_turn, BUILD_PAUSE_S), loop.time()
                builders = [b for b in self._building[2].values() if not b.step_done]
                if not builders:
                    self._build_done(send_ahead=left_s <= SEND_AHEAD_S)
                need_s = sum(b.work_left_s() for b in builders)
                budget = min(max(SLICE_S, 2 * need_s * turn_s / left_s), SLICE_MAX_S)
                try:
                    if builders:
                        builders[0].step(budget)
                except Exception as exc:  # one odd entry must not stop rotating for good
                    self._abandon_build()
                    self._metrics.rotation_failures.inc()
                    self._log.error("sync_rotation_failed", epoch=self.epoch, to_epoch=epoch,
                                    error=repr(exc)[:200])
                    break
                await asyncio.sleep(min(max(left_s, 0.0), BUILD_PAUSE_S))

    def _build_done(self, *, send_ahead: bool) -> None:
        """Every document of the build under way holds what it should now: peers' parts
        sent ahead may be applied to it, and (``send_ahead``) ours are sent."""
        for hub in self._hubs.values():
            hub.ahead_ready()
            if send_ahead:
                hub.send_ahead()

    def _end_overlap_if_late(self) -> None:
        """End an overlap no peer finished within ``OVERLAP_MAX_S`` (a silent peer)."""
        if self._clock() - self._rotated_at >= OVERLAP_MAX_S:
            for hub in self._hubs.values():
                if hub.previous is not None:
                    self._log.info("sync_rotation_overlap_timeout", doc=hub.name,
                                   seconds=OVERLAP_MAX_S)
                    hub.end_overlap()

    # -- peers -----------------------------------------------------------------------

    def _add_peer(self, base_url: str) -> None:
        if base_url in self._links or self._session is None or self._paused or self._closed:
            return
        sups: list[Transport] = [
            LinkSupervisor(
                base_url=base_url,
                hub=hub,
                settings=self.settings,
                writer_id=self.writer_id,
                session=self._session,
                metrics=self._metrics,
                epoch=lambda: self.epoch,
                on_peer_epoch=self._on_peer_epoch,
                sleep=self._sleep,
            )
            for hub in self._hubs.values()
        ]
        self._links[base_url] = sups
        for sup in sups:
            sup.start()

    def _add_relay(self) -> None:
        """Join every document to the relay engine (``sync.relay``), if there is one."""
        relay = self._relay
        if relay is None or relay.label in self._links or self._paused or self._closed:
            return
        links: list[Transport] = [relay.link(hub) for hub in self._hubs.values()]
        self._links[relay.label] = links
        for link in links:
            link.start()

    async def _on_discovered(self, urls: set[str]) -> None:
        """Make the discovered peers exactly ``urls`` (static peers are never dropped)."""
        gone = self._discovered - urls - set(self.settings.peers)
        self._discovered = urls
        for url in sorted(urls):
            self._add_peer(url)
        for url in sorted(gone):
            sups = self._links.pop(url, [])
            await asyncio.gather(*(sup.aclose() for sup in sups))
            if sups:
                self._log.info("sync_peer_dropped", peer=url, reason="no longer in DNS")

    # -- snapshot and metrics ----------------------------------------------------------

    async def _load_snapshot(self) -> None:
        path = self.settings.snapshot_path
        if not path or not os.path.exists(path):
            return
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
            epoch, updates = decode_snapshot(data)
            self.epoch = max(self.epoch, epoch)
            for name, hub in self._hubs.items():
                if name in updates:
                    loaded = load_update(name, epoch, updates[name])
                    hub.install(
                        loaded
                        if epoch == self.epoch
                        else rebuild(loaded, self.epoch, self.store.keep)
                    )
            self._metrics.epoch.set(self.epoch)
            self._log.info("sync_snapshot_loaded", path=path, epoch=epoch)
        except (OSError, SnapshotError) as exc:
            self._log.error("sync_snapshot_load_failed", path=path, error=str(exc))

    async def _write_snapshot(self) -> None:
        path = self.settings.snapshot_path
        assert path is not None
        data = encode_snapshot(self.epoch, {n: h.doc.full_update() for n, h in self._hubs.items()})
        try:
            await asyncio.to_thread(_write_atomic, path, data)
        except OSError as exc:
            self._log.error("sync_snapshot_write_failed", path=path, error=str(exc))

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_EVERY_S)
            await self._write_snapshot()

    async def _size_loop(self) -> None:
        loop = asyncio.get_running_loop()
        measure_at = 0.0
        while True:
            if loop.time() >= measure_at:
                measure_at = loop.time() + self._measure_documents() / SIZE_MEASURE_SHARE
            self._metrics.objects.set(len(self.objects))  # peers' writes count too
            self._metrics.sessions.set(self.store.session_count)
            await asyncio.sleep(SIZE_METRIC_EVERY_S)

    def _measure_documents(self) -> float:
        """Measure each document's encoded size (metric, and the gate's size limit);
        return the seconds it took. Between measurements the gate adds up the updates."""
        started = time.perf_counter()
        for name, size in self.document_sizes().items():
            self._metrics.document_bytes.labels(name).set(size)
            self._hubs[name].measured(size)
        return time.perf_counter() - started

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro))


#: Longest ``?instance=`` accepted: an instance id plus its writer suffix.
MAX_INSTANCE_CHARS: Final = 200
#: Epochs are ``wall clock / rotate_every_s``: 20 digits is far beyond any real one.
MAX_EPOCH_DIGITS: Final = 20


def _bad_query(instance: str | None, epoch: str) -> str | None:
    """What is wrong with a sync request's query parameters, or None."""
    if epoch and not (epoch.isascii() and epoch.isdigit() and len(epoch) <= MAX_EPOCH_DIGITS):
        return "the 'epoch' query parameter must be a whole number (the sender's epoch)"
    if instance is not None and not (0 < len(instance) <= MAX_INSTANCE_CHARS
                                     and instance.isascii() and instance.isprintable()):
        return (f"the 'instance' query parameter must be 1 to {MAX_INSTANCE_CHARS} printable "
                "ASCII characters (the sender's writer id)")
    return None


_REFUSAL_CODES: Final = {400: "invalid_request", 401: "invalid_sync_token", 404: "not_found",
                          409: "conflict", 503: "unavailable"}


def _refuse(status: int, text: str, header: str | None = None, value: str = "") -> web.Response:
    """A refusal in the OpenAI error shape every skyroute error has."""
    error = {"message": text, "type": "invalid_request_error" if status < 500 else "server_error",
             "param": None, "code": _REFUSAL_CODES.get(status)}
    return web.json_response({"error": error}, status=status,
                             headers={header: value} if header else None)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
