"""Fleet mode: the documents relayed through Redis Streams instead of a mesh of links.

Rules / theory of operation
---------------------------
The design is y-redis's: one stream per document, and a compacted snapshot beside it.

* Keys, per document and epoch (hash-tagged, so a Redis Cluster keeps them on one
  slot and MULTI works): ``{prefix}{doc:epoch}:log`` (the stream of updates),
  ``...:snap`` (a hash: ``u`` the whole document as one update, ``id`` the last
  stream entry it includes, ``trimmed`` where the stream was cut, ``m`` its MAC),
  ``...:lock`` (who compacts now), and ``{prefix}epoch`` (the newest epoch joined,
  as ``N:mac``, signed like the entries; a value without a valid MAC is refused,
  logged and counted as an auth failure, and overwritten by the next join).
* Publishing: a ``RelayLink`` attaches a connection to its ``DocHub`` like a Yjs
  client (it gets every change but the ones it delivered itself), and each
  change becomes one XADD: one message per update per instance, whatever the
  fleet size (the mesh sends N-1). Entries carry ``u`` (the update), ``w`` (the
  writer id) and ``m``: HMAC-SHA256 keyed with ``sync.token`` over document,
  epoch, writer and payload, so the sync token stays what admits a writer, also
  on an engine shared with other users (the engine's own credential, in the URL,
  guards the keys).
* Reading: XREAD BLOCK from the last id. Our own entries are skipped; an entry
  whose MAC is wrong is dropped and counted as an auth failure; every other
  update goes through ``DocHub.apply_remote``, the same ``UpdateGate`` checks a
  mesh peer's update passes. One that fails is dropped and counted; the stream
  is shared, so there is no connection to close (the mesh closes the link).
* Joining (start, after the engine was away, a new epoch): read the snapshot and
  the whole stream in one MULTI, apply the snapshot then the entries after its
  ``id``, then publish what the engine lacks (our document diffed against the
  state vector of what was read): writes made while the engine was away, or this
  instance's rebuilt document after a rotation. So a new instance catches up
  from snapshot + tail, and the engine catches up from the instances when it
  comes back empty.
* Compaction, every ``compact_every_s``: one instance (a SET NX lock) writes its
  whole document as the snapshot with the last id it applied, and trims the
  stream to the *previous* snapshot's id (a Lua script, so snapshots only move
  forward). One interval of tail stays, so a reader a little behind loses
  nothing; a reader behind the trim point (it checks each interval) re-joins.
* Epochs stay as on the mesh (``_sync``): the keys are per epoch. An instance
  that rotates appends ``{e: N}`` to the old epoch's stream, so instances still
  reading it rotate at once, and a joining instance reads (and raises)
  ``{prefix}epoch``. Keys expire two rotation periods after their last write.
* The engine away: reads and writes time out within ``dead_after_s``; the link
  goes to BACKOFF (``/health``, ``skyroute_sync_peers_connected``) and redials
  with the mesh's backoff. Requests are served from the local documents all
  along; state just stops syncing until the engine is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, final
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from pycrdt import Doc, read_message
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from skyroute.routing import Sleep

from ._doc import DocHub
from ._links import MAX_QUEUED_MESSAGES, link_backoff
from ._metrics import SyncMetrics, get_logger
from ._protocol import ConnState, YConnection, message_kind
from ._types import LinkState, SyncProtocolError, SyncSettings

READ_BATCH: Final = 512
"""Entries one XREAD returns at most: a backlog is applied in bounded slices."""
KEEP_EPOCHS: Final = 2
"""An epoch's keys outlive their last write by this many rotation periods."""
_EMPTY_UPDATE: Final = b"\x00\x00"

# Snapshots only move forward, and the stream is cut where the previous one was.
_COMPACT_LUA: Final = """
local function parts(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local cur = redis.call('HGET', KEYS[1], 'id') or '0-0'
local cm, cs = parts(cur)
local nm, ns = parts(ARGV[2])
if not (cm < nm or (cm == nm and cs < ns)) then return 0 end
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'id', ARGV[2], 'trimmed', cur, 'm', ARGV[3])
redis.call('XTRIM', KEYS[2], 'MINID', cur)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""
# Compare-and-set: the epoch key is replaced only if it still holds what was checked.
_SET_EPOCH_LUA: Final = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[2] then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return false
"""
_EPOCH_CAS_TRIES: Final = 3


def engine_label(url: str) -> str:
    """``url`` without its credentials: what ``/health`` and logs may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class _Rejoin(Exception):
    """The link must read the engine afresh (behind the trim point, or rotated)."""


@final
class RedisRelay:
    """The engine connection of one instance; makes one ``RelayLink`` per document."""

    def __init__(self, settings: SyncSettings, *, writer_id: str, metrics: SyncMetrics,
                 on_peer_epoch: Callable[[int], Coroutine[Any, Any, None]],
                 sleep: Sleep = asyncio.sleep) -> None:
        if settings.relay_url is None or settings.token is None:
            raise ValueError("RedisRelay needs settings.relay_url and settings.token")
        self.settings = settings
        self.label = engine_label(settings.relay_url)
        self.writer_id = writer_id
        self.metrics = metrics
        self.on_peer_epoch = on_peer_epoch
        self.sleep = sleep
        self._key = settings.token.encode()
        # Our own backoff redials; redis-py's retries would only hide an outage longer.
        self.client = redis.Redis.from_url(
            settings.relay_url,
            socket_timeout=settings.dead_after_s + settings.ping_interval_s,
            socket_connect_timeout=settings.dead_after_s,
            retry=Retry(NoBackoff(), 0),
        )

    def __repr__(self) -> str:
        return f"<RedisRelay {self.label}>"

    def link(self, hub: DocHub) -> RelayLink:
        """A link joining ``hub``'s document to the engine (not started)."""
        return RelayLink(self, hub)

    async def aclose(self) -> None:
        """Close the engine connection pool."""
        await self.client.aclose()

    def key(self, doc: str, epoch: int, part: str) -> str:
        return f"{self.settings.relay_prefix}{{{doc}:{epoch}}}:{part}"

    def epoch_key(self) -> str:
        return f"{self.settings.relay_prefix}epoch"

    def mac(self, *parts: bytes) -> bytes:
        """The MAC of one entry or snapshot (keyed with ``sync.token``)."""
        return hmac.new(self._key, b"|".join(parts), hashlib.sha256).digest()

    def mac_ok(self, mac: bytes | None, *parts: bytes) -> bool:
        return mac is not None and hmac.compare_digest(mac, self.mac(*parts))

    def signed_epoch(self, epoch: int) -> bytes:
        """The epoch key's value: ``N:mac`` (hex), the MAC over prefix and ``N``."""
        number = str(epoch).encode()
        return number + b":" + self.mac(b"epoch", self.settings.relay_prefix.encode(),
                                         number).hex().encode()

    def epoch_value(self, raw: bytes | None) -> int | None:
        """The epoch in ``raw`` if it is signed with ``sync.token``; None otherwise
        (a value that is there but not signed is logged and counted)."""
        if not raw:
            return None
        number, _, mac_hex = raw.partition(b":")
        try:
            mac = bytes.fromhex(mac_hex.decode())
        except ValueError:
            mac = None
        if number.isdigit() and self.mac_ok(mac, b"epoch",
                                            self.settings.relay_prefix.encode(), number):
            return int(number)
        self.metrics.auth_failures.inc()
        get_logger().warning("sync_relay_epoch_refused", key=self.epoch_key(),
                             hint="its MAC does not match this instance's sync.token; "
                                  "ignored and replaced by this instance's epoch")
        return None

    async def join_epoch(self, epoch: int) -> int:
        """Raise ``{prefix}epoch`` to ``epoch``; return the newest signed epoch there."""
        key = self.epoch_key()
        for _ in range(_EPOCH_CAS_TRIES):
            value = await self.client.get(key)
            raw = value if isinstance(value, bytes) else None
            theirs = self.epoch_value(raw)
            if theirs is not None and theirs >= epoch:
                return theirs
            changed = await self.client.eval(_SET_EPOCH_LUA, 1, key, self.signed_epoch(epoch),
                                             raw or b"")
            if changed is None:
                return epoch
        return epoch  # others keep raising it meanwhile; their entries will tell us

    @property
    def ttl_ms(self) -> int:
        return int((KEEP_EPOCHS * self.settings.rotate_every_s + 60.0) * 1000)


@final
class RelayLink:
    """Keeps one document joined to the engine: publish, read, compact; rejoins on failure.

    Behaves as a mesh link does towards ``StateSync``: ``url``, ``state``,
    ``start``, ``aclose``.
    """

    def __init__(self, relay: RedisRelay, hub: DocHub, *, rng: random.Random | None = None
                 ) -> None:
        self.url = f"{relay.label}/{hub.name}"
        self._relay = relay
        self._hub = hub
        self._rng = rng if rng is not None else random.Random()
        self._state = LinkState.CONNECTING
        self._task: asyncio.Task[None] | None = None
        self._last_id = b"0-0"
        self._log = get_logger().bind(peer=self.url, doc=hub.name)

    def __repr__(self) -> str:
        return f"<RelayLink {self.url} {self._state.name}>"

    @property
    def state(self) -> LinkState:
        return self._state

    def start(self) -> None:
        """Start joining (and rejoining) as a task."""
        if self._task is not None:
            raise RuntimeError("start() called twice")
        self._task = asyncio.create_task(self._run(), name=f"statesync-relay {self.url}")

    async def aclose(self) -> None:
        """Stop; the state becomes CLOSED. Waits at most ``dead_after_s`` for the task."""
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait, not wait_for: a stuck engine call must not hold shutdown.
            await asyncio.wait([self._task], timeout=self._relay.settings.dead_after_s)
        self._state = LinkState.CLOSED

    async def _run(self) -> None:
        delays = link_backoff(self._rng)
        while True:
            self._state = LinkState.CONNECTING
            try:
                await self._joined()
                delays = link_backoff(self._rng)  # rotated or behind: rejoin at once
                continue
            except (RedisError, OSError, TimeoutError) as exc:
                self._log.warning("sync_relay_unreachable", error=repr(exc)[:200],
                                  hint="state stops syncing until the engine is back; "
                                       "requests are served meanwhile")
            except Exception as exc:  # an odd answer must not end the link for good
                self._log.error("sync_relay_failed", error=repr(exc)[:200])
            self._state = LinkState.BACKOFF
            await self._relay.sleep(next(delays))

    async def _joined(self) -> None:
        """One stay in the engine: join, then publish/read/compact until something ends it."""
        relay, hub = self._relay, self._hub
        epoch = hub.doc.epoch
        newest = await relay.join_epoch(epoch)
        if newest > epoch:
            self._log.info("sync_epoch_adopted", epoch=newest)
            await relay.on_peer_epoch(newest)
            return
        log_key, snap_key = relay.key(hub.name, epoch, "log"), relay.key(hub.name, epoch, "snap")
        async with relay.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(snap_key)
            pipe.xrange(log_key, "-", "+")
            snap, entries = await pipe.execute()
        if hub.doc.epoch != epoch:
            return  # rotated while we read
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        closed = asyncio.Event()

        def on_send(message: bytes | str) -> None:
            if isinstance(message, bytes) and message_kind(message) == "sync_update":
                if queue.qsize() >= MAX_QUEUED_MESSAGES:
                    conn.close("send queue overflow")  # the rejoin publishes the diff
                else:
                    queue.put_nowait(read_message(message[2:]))

        conn = YConnection(hub, name=self.url, external=True, on_send=on_send,
                           on_close=closed.set)
        hub.attach(conn)
        try:
            engine = self._catch_up(conn, epoch, snap, entries)
            missing = hub.doc.diff(engine.get_state())
            if missing != _EMPTY_UPDATE:
                queue.put_nowait(missing)
            self._state = LinkState.CONNECTED
            relay.metrics.peers_connected.inc()
            try:
                await self._serve(conn, epoch, queue, closed)
            finally:
                relay.metrics.peers_connected.dec()
                self._state = LinkState.CONNECTING
        finally:
            hub.detach(conn)
            conn.close("relay link ended")
        if hub.doc.epoch > epoch:
            await self._announce_rotation(epoch, hub.doc.epoch)

    def _catch_up(self, conn: YConnection, epoch: int, snap: dict[bytes, bytes],
                  entries: list[tuple[bytes, dict[bytes, bytes]]]) -> Doc[Any]:
        """Apply the snapshot and the entries after it; return what the engine holds."""
        relay = self._relay
        engine: Doc[Any] = Doc()
        start = (0, 0)
        self._last_id = b"0-0"
        update, snap_id = snap.get(b"u"), snap.get(b"id")
        if update is not None and snap_id is not None:
            name = self._hub.name.encode()
            if relay.mac_ok(snap.get(b"m"), b"snap", name, str(epoch).encode(), snap_id,
                            update):
                self._apply(conn, update, writer="snapshot")
                with contextlib.suppress(Exception):  # pycrdt raises plain Exceptions
                    engine.apply_update(update)
                start, self._last_id = _stream_id(snap_id), snap_id
            else:
                relay.metrics.auth_failures.inc()
                self._log.error("sync_relay_snapshot_refused",
                                hint="its MAC does not match this instance's sync.token")
        for entry_id, fields in entries:
            if _stream_id(entry_id) <= start:
                continue
            update = self._entry(conn, epoch, entry_id, fields)
            if update is not None:
                with contextlib.suppress(Exception):
                    engine.apply_update(update)
        return engine

    async def _serve(self, conn: YConnection, epoch: int, queue: asyncio.Queue[bytes],
                     closed: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._send_loop(epoch, queue)),
                 asyncio.create_task(self._read_loop(conn, epoch)),
                 asyncio.create_task(self._compact_loop(epoch)),
                 asyncio.create_task(closed.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, _Rejoin):
                raise exc

    async def _send_loop(self, epoch: int, queue: asyncio.Queue[bytes]) -> None:
        relay, metrics = self._relay, self._relay.metrics
        log_key = relay.key(self._hub.name, epoch, "log")
        head = (self._hub.name.encode(), str(epoch).encode(), relay.writer_id.encode())
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            async with relay.client.pipeline(transaction=False) as pipe:
                for update in batch:
                    pipe.xadd(log_key, {"u": update, "w": head[2],
                                        "m": relay.mac(*head, update)})
                await pipe.execute()  # one round trip for everything queued meanwhile
            for update in batch:
                metrics.count_message("out", "sync_update", len(update))

    async def _read_loop(self, conn: YConnection, epoch: int) -> None:
        relay = self._relay
        log_key = relay.key(self._hub.name, epoch, "log")
        block_ms = max(1, int(relay.settings.ping_interval_s * 1000))
        while conn.state is ConnState.OPEN:
            answer: Any = await relay.client.xread({log_key: self._last_id},
                                                   count=READ_BATCH, block=block_ms)
            for _stream, entries in answer or ():
                for entry_id, fields in entries:
                    self._entry(conn, epoch, entry_id, fields)

    def _entry(self, conn: YConnection, epoch: int, entry_id: bytes,
               fields: dict[bytes, bytes]) -> bytes | None:
        """Handle one stream entry; return its update if it is one (any writer)."""
        relay = self._relay
        self._last_id = entry_id
        writer, mac = fields.get(b"w", b""), fields.get(b"m")
        head = (self._hub.name.encode(), str(epoch).encode(), writer)
        update, rotated = fields.get(b"u"), fields.get(b"e")
        payload = update if update is not None else b"e" + (rotated or b"")
        relay.metrics.count_message("in", "sync_update" if update is not None else "control",
                                    len(payload))
        if not relay.mac_ok(mac, *head, payload):
            relay.metrics.auth_failures.inc()
            self._log.warning("sync_relay_entry_refused", entry=entry_id.decode(),
                              hint="its MAC does not match this instance's sync.token")
            return None
        if rotated is not None and rotated.isdigit():
            if int(rotated) > epoch:
                self._spawn_rotation(int(rotated))
            return None
        if update is None:
            return None
        if writer != relay.writer_id.encode():
            self._apply(conn, update, writer=writer.decode(errors="replace"))
        return update

    def _spawn_rotation(self, epoch: int) -> None:
        task = asyncio.get_running_loop().create_task(self._relay.on_peer_epoch(epoch))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    def _apply(self, conn: YConnection, update: bytes, *, writer: str) -> None:
        try:
            self._hub.apply_remote(update, conn)
        except SyncProtocolError as exc:
            # Counted by the hub (updates_rejected); the other entries still apply.
            self._log.warning("sync_message_rejected", writer=writer, error=str(exc)[:200])

    async def _compact_loop(self, epoch: int) -> None:
        relay, hub = self._relay, self._hub
        every = relay.settings.relay_compact_every_s
        log_key, snap_key = relay.key(hub.name, epoch, "log"), relay.key(hub.name, epoch, "snap")
        lock_key = relay.key(hub.name, epoch, "lock")
        while True:
            await asyncio.sleep(every * (0.75 + 0.5 * self._rng.random()))  # fleet out of step
            snap_id, trimmed = await relay.client.hmget(snap_key, ["id", "trimmed"])
            if trimmed is not None and _stream_id(self._last_id) < _stream_id(trimmed):
                self._log.info("sync_relay_behind", hint="entries were trimmed: reading afresh")
                raise _Rejoin
            last = self._last_id
            if last in (b"0-0", snap_id) or not await relay.client.set(
                    lock_key, relay.writer_id, nx=True, px=max(1, int(every * 1000))):
                continue
            started = time.perf_counter()
            update = hub.doc.full_update()
            mac = relay.mac(b"snap", hub.name.encode(), str(epoch).encode(), last, update)
            done = await relay.client.eval(_COMPACT_LUA, 2, snap_key, log_key, update, last,
                                           mac, relay.ttl_ms)
            if done:
                relay.metrics.relay_compactions.inc()
                self._log.info("sync_relay_compacted", bytes=len(update), upto=last.decode(),
                               seconds=round(time.perf_counter() - started, 4))

    async def _announce_rotation(self, old: int, new: int) -> None:
        """Tell instances still reading the old epoch's stream to rotate (best effort)."""
        relay = self._relay
        head = (self._hub.name.encode(), str(old).encode(), relay.writer_id.encode())
        payload = str(new).encode()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with relay.client.pipeline(transaction=False) as pipe:
                pipe.xadd(relay.key(self._hub.name, old, "log"),
                          {"e": payload, "w": head[2], "m": relay.mac(*head, b"e" + payload)})
                for part in ("log", "snap"):
                    pipe.pexpire(relay.key(self._hub.name, old, part), relay.ttl_ms)
                await pipe.execute()


_pending: set[asyncio.Task[None]] = set()
"""Rotations started from a control entry (held so they are not collected mid-run)."""


__all__ = ["RedisRelay", "RelayLink", "engine_label"]
