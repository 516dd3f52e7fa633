"""Epoch documents and the hub that joins one document to its connections.

Rules / theory of operation
---------------------------
* An ``EpochDoc`` is one pycrdt document for one epoch. It knows which
  transaction is being applied on behalf of which connection (the *origin*), so a
  change is relayed to every connection except the one it came from. Local writes
  have no origin and go to every connection.
* A ``DocHub`` serves one document name (``sessions``, ``usage``) and owns the
  current ``EpochDoc``, the connections attached to it and the awareness states of
  external Yjs clients. ``install`` swaps in the next epoch's document (built beside
  the live one, ``_rotation``), and a rebuilt document is never merged into an old
  one (nor an old one into it): Yjs clients and older instances are closed; a peer
  that rotates in-band keeps its connection and gets ``{"epoch": N}``, our own part
  of the new document, then our SYNC_STEP1. Whatever that peer sends after our
  rotation and before its own ``{"epoch": N}`` belongs to its old document
  (``is_stale``): an update among it (a write that was in flight when we rotated) is
  checked by the old document's gate and applied to the previous document
  (``receive``), and listeners put what it wrote into the new one at once
  (``on_late_change``) instead of waiting one more delay for its writer's part. Such
  a change is never relayed: every peer is in the new epoch by then. So a rotation
  costs no reconnect, and no write waits for one.
* Parts sent ahead: once its build is done, shortly before the install, an instance
  sends its own part of the document it builds (``send_ahead``, ``{"ahead": N, ...}``);
  a peer applies it to the document it builds for N, through that document's gate,
  once its build wrote every shared item (``ahead_ready``). At the install only what
  was written since goes out, so the costly integration of a part is not done at
  the moment every instance switches. The store checks what those parts changed
  (``on_ahead_applied``, ``on_ahead_arrived``) as it would a remote change.
* Overlap: after ``install`` the previous document stays readable (``value``) for
  entries the new one has not got yet (a recent entry comes with its writer's part),
  until every peer connection has sent its SYNC_STEP1 in the new epoch or
  ``end_overlap``; listeners then carry what never came (``on_overlap_end``).
* ``rebuild`` copies the live entries of a document into a fresh one (new client
  id, no tombstones, no history): this is what bounds the size. Which entries are
  live is the caller's decision (``keep``).
* Client ids of retired documents are remembered for two epochs: a Yjs client that
  reconnects still holding an old document announces them in its SYNC_STEP1 and
  is refused (close code 4409) instead of pouring the old history back in.
* Relaying follows ``_relay``: each change once per peer instance, never to an
  instance that says it is linked to the one the change came from. The hub tells
  its peers its own links (``links_frame``) whenever the set of instances it holds
  a connection with changes; when that set loses an instance, it also asks every
  remaining peer for what it lacks (SYNC_STEP1), since they may have skipped it.
* The snapshot format is JSON: ``{"epoch": n, "docs": {name: base64(update)}}``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, final

from pycrdt import (
    Awareness,
    Doc,
    Map,
    MapEvent,
    Subscription,
    TransactionEvent,
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    write_message,
    write_var_uint,
)
from pycrdt import create_sync_message as _create_step1

from ._control import ahead_frame, epoch_frame, links_frame
from ._metrics import SyncMetrics, get_logger
from ._protocol import ConnState, YConnection, decode_state_vector, update_message, update_of
from ._relay import relay_targets
from ._types import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    SnapshotError,
    SyncProtocolError,
)
from ._validate import UpdateGate, UpdateRejected

DOC_MAPS: Final[dict[str, tuple[str, ...]]] = {
    "sessions": ("sessions", "upstreams", "objects", "meta"),
    "usage": ("usage", "meta", "shares"),
}
"""Root maps of each document. ``meta`` holds one heartbeat entry per writer."""

RETIRED_EPOCHS_KEPT: Final = 2
MAX_QUEUED_AHEAD: Final = 64
"""Parts sent ahead kept while the build is not done yet: one per peer instance is usual."""
BULK_UPDATE_BYTES: Final = 64 * 1024
"""An update at least this big (a catch-up, a rebuilt document) is checked and applied with
the cyclic garbage collector paused; see ``collector_paused``."""
_STEP2_HEADER: Final = bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2])

EMPTY_UPDATE: Final = b"\x00\x00"
UpdateListener = Callable[[bytes, object | None], None]
MapListener = Callable[[str, dict[str, Any], bool], None]
"""Called with (map name, ``MapEvent.keys``, is_remote) after each change."""
OverlapListener = Callable[["EpochDoc", set[tuple[str, str]], set[tuple[str, str]] | None], None]
"""Called with the previous epoch's document, the (map, key)s deleted since, and the
(map, key)s the current document may lack (None: any)."""
AheadListener = Callable[["EpochDoc", set[tuple[str, str]]], None]
"""Called with a document and the (map, key)s that peers' parts sent ahead changed in the
next epoch's document (see ``DocHub.send_ahead``): once as each part is applied (with the
document being built), and after ``install`` (with the previous document, all of them)."""
LateListener = Callable[[str, dict[str, Any]], None]
"""Called with (map name, ``MapEvent.keys``) of a change a late update made to the previous
epoch's document (see ``DocHub.receive``)."""


@final
class EpochDoc:
    """One document of one epoch; ``maps`` are its root Y.Maps by name."""

    def __init__(self, name: str, epoch: int) -> None:
        self.name = name
        self.epoch = epoch
        self.doc: Doc[Any] = Doc()
        self.maps: dict[str, Map[Any]] = {m: self.doc.get(m, type=Map) for m in DOC_MAPS[name]}
        self._origin: object | None = None
        self._update_listeners: list[UpdateListener] = []
        self._map_listeners: list[MapListener] = []
        # Subscriptions are held: pycrdt drops an observer whose subscription is collected.
        # They are made with the first listener: pycrdt turns every change of an observed
        # map into Python values, which a document being built (rebuild) needs for nothing.
        self._subscriptions: list[Subscription] = []
        self._maps_observed = False

    def __repr__(self) -> str:
        return f"<EpochDoc {self.name} epoch={self.epoch} client={self.doc.client_id}>"

    @property
    def is_applying_remote(self) -> bool:
        """True while an update received from a connection is being applied."""
        return self._origin is not None

    def on_update(self, listener: UpdateListener) -> None:
        """Call ``listener(update, origin)`` for every committed change (origin None = local)."""
        if not self._update_listeners:
            self._subscriptions.append(self.doc.observe(self._on_transaction))
        self._update_listeners.append(listener)

    def on_map_change(self, listener: MapListener) -> None:
        """Call ``listener(map_name, keys, is_remote)`` for every root-map change."""
        if not self._maps_observed:  # once: off_map_change may empty the list again
            self._maps_observed = True
            for map_name, ymap in self.maps.items():
                self._subscriptions.append(ymap.observe(self._map_observer(map_name)))
        self._map_listeners.append(listener)

    def off_map_change(self, listener: MapListener) -> None:
        """Stop calling ``listener`` (no-op if it was not registered)."""
        if listener in self._map_listeners:
            self._map_listeners.remove(listener)

    def apply_remote(self, update: bytes, origin: object) -> None:
        """Apply an update received from ``origin``.

        Raises:
            SyncProtocolError: pycrdt rejected the update; the document is unchanged.
        """
        self._origin = origin
        try:
            self.doc.apply_update(update)
        except Exception as exc:  # pycrdt raises plain Exceptions from Rust
            raise SyncProtocolError(f"cannot apply update to {self.name}: {exc!r}") from exc
        finally:
            self._origin = None

    def state_vector(self) -> bytes:
        """The encoded state vector (what SYNC_STEP1 carries)."""
        return self.doc.get_state()

    def diff(self, state_vector: bytes) -> bytes:
        """Everything this document has that ``state_vector`` lacks."""
        try:
            return self.doc.get_update(state_vector)
        except Exception as exc:
            raise SyncProtocolError(f"bad state vector for {self.name}: {exc!r}") from exc

    def full_update(self) -> bytes:
        """The whole document as one update (snapshots, size measurement)."""
        return self.doc.get_update()

    def client_ids(self) -> set[int]:
        """Client ids that wrote to this document."""
        return set(decode_state_vector(self.doc.get_state()))

    def own_update(self, since: int = 0) -> bytes:
        """This document's own writes (its client id's items) from clock ``since`` on, and
        its deletions."""
        clocks = decode_state_vector(self.doc.get_state())
        own = self.doc.client_id
        known = {c: n for c, n in clocks.items() if c != own}
        if since and own in clocks:
            known[own] = min(since, clocks[own])
        return self.diff(encode_state_vector(known))

    def own_clock(self) -> int:
        """How many items this document's own client wrote so far."""
        return decode_state_vector(self.doc.get_state()).get(self.doc.client_id, 0)

    def _on_transaction(self, event: TransactionEvent) -> None:
        update = event.update
        for listener in self._update_listeners:
            listener(update, self._origin)

    def _map_observer(self, map_name: str) -> Callable[[MapEvent], None]:
        # One positional parameter only: pycrdt passes the transaction as a second
        # argument to callbacks that accept two.
        def observer(event: MapEvent) -> None:
            self._on_map_event(map_name, _changed_keys(event))

        return observer

    def _on_map_event(self, map_name: str, keys: dict[str, Any]) -> None:
        remote = self._origin is not None
        for listener in self._map_listeners:
            listener(map_name, keys, remote)


def encode_state_vector(clocks: dict[int, int]) -> bytes:
    """Encode ``{client_id: clock}`` as a Yjs state vector (inverse of ``decode_state_vector``)."""
    parts = [write_var_uint(len(clocks))]
    for client, clock in clocks.items():
        parts += (write_var_uint(client), write_var_uint(clock))
    return b"".join(parts)


def _changed_keys(event: MapEvent) -> dict[str, Any]:
    """The keys a map event changed, each with its action and old/new value."""
    # pycrdt fills MapEvent's slots by name and does not annotate ``keys``, so read it by
    # name too and check what came back rather than let an unknown type spread.
    keys = getattr(event, "keys", None)
    if not isinstance(keys, dict):
        raise TypeError(f"pycrdt MapEvent.keys is {type(keys).__name__}, expected dict")
    return keys


@contextlib.contextmanager
def collector_paused(pause: bool = True) -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a bulk copy of document values.

    Reading a whole document (a catch-up, a rotation) turns every value into Python dicts
    at once, all alive until the copy ends, and each full collection meanwhile walks them
    all: at 100,000 sessions that made the time per session half as much again as at
    10,000 (``bench/sessions.py``). The values hold no cycles, so nothing waits longer to
    be freed than the copy takes. Synchronous code only: nothing else runs meanwhile.
    """
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def rebuild(old: EpochDoc, epoch: int, keep: Callable[[str, str, Any], bool]) -> EpochDoc:
    """Return a fresh document for ``epoch`` holding the entries of ``old`` that ``keep``."""
    new = EpochDoc(old.name, epoch)
    with collector_paused(), new.doc.transaction():
        for map_name, ymap in old.maps.items():
            target = new.maps[map_name]
            for key, value in list(ymap.items()):
                if keep(map_name, key, value):
                    target[key] = value
    return new


def load_update(name: str, epoch: int, update: bytes) -> EpochDoc:
    """Build a document of ``epoch`` from a full update (a snapshot).

    Raises:
        SnapshotError: the update does not decode.
    """
    doc = EpochDoc(name, epoch)
    try:
        doc.doc.apply_update(update)
    except Exception as exc:
        raise SnapshotError(f"snapshot of {name} does not decode: {exc!r}") from exc
    return doc


def encode_snapshot(epoch: int, updates: dict[str, bytes]) -> bytes:
    """Serialise documents of one epoch for the disk snapshot."""
    docs = {name: base64.b64encode(update).decode("ascii") for name, update in updates.items()}
    return json.dumps({"epoch": epoch, "docs": docs}).encode()


def decode_snapshot(data: bytes) -> tuple[int, dict[str, bytes]]:
    """Inverse of ``encode_snapshot``.

    Raises:
        SnapshotError: the data is not a snapshot.
    """
    try:
        raw = json.loads(data)
        epoch = int(raw["epoch"])
        docs = {str(k): base64.b64decode(v, validate=True) for k, v in raw["docs"].items()}
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SnapshotError(f"snapshot is malformed: {exc!r}") from exc
    return epoch, docs


@final
class DocHub:
    """Serves one document name: current epoch doc, its connections, awareness."""

    def __init__(self, doc: EpochDoc, *, metrics: SyncMetrics,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
                 max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> None:
        self.name = doc.name
        self._metrics = metrics
        self._limits = {"max_value_bytes": max_value_bytes,
                        "max_document_bytes": max_document_bytes}
        self.connections: set[YConnection] = set()
        self._retired: list[set[int]] = []
        self._linked: frozenset[str] = frozenset()
        self.on_epoch_request: Callable[[int], None] | None = None
        """Called with a newer epoch a peer announced in-band (StateSync rotates to it)."""
        self._doc_listeners: list[Callable[[EpochDoc], None]] = []
        self._overlap_listeners: list[OverlapListener] = []
        self._late_listeners: list[LateListener] = []
        self._late_changes: list[tuple[str, dict[str, Any]]] | None = None
        """Changes of the previous document, collected while a late update is applied."""
        self._previous_gate: UpdateGate | None = None
        self._ahead_listeners: list[AheadListener] = []
        self._ahead_applied_listeners: list[AheadListener] = []
        self._ahead_ready = False
        self._ahead_queue: list[tuple[YConnection, bytes]] = []
        self._ahead_keys: set[tuple[str, str]] = set()
        self._sent_ahead: tuple[EpochDoc, int, set[str | None]] | None = None
        """(prepared document, its own clock, the peers told) when its part was sent ahead."""
        self.doc = doc
        self.previous: EpochDoc | None = None
        """The last epoch's document while the rotation overlaps (see ``value``)."""
        self._deleted: set[tuple[str, str]] = set()
        self._left: set[tuple[str, str]] | None = None
        """Entries the current document may lack during the overlap (None: any)."""
        self._synced: set[YConnection] = set()
        self._prepared: tuple[EpochDoc, UpdateGate] | None = None
        self._awareness = self._new_awareness(doc)
        self._gate = self._new_gate(doc)
        self._follow(doc)

    def __repr__(self) -> str:
        return f"<DocHub {self.name} epoch={self.doc.epoch} connections={len(self.connections)}>"

    def on_new_doc(self, listener: Callable[[EpochDoc], None]) -> None:
        """Call ``listener(doc)`` after each ``install`` (stores re-attach observers)."""
        self._doc_listeners.append(listener)

    def on_overlap_end(self, listener: OverlapListener) -> None:
        """Call ``listener(previous, deleted)`` when a rotation's overlap ends (see ``value``)."""
        self._overlap_listeners.append(listener)

    def on_late_change(self, listener: LateListener) -> None:
        """Call ``listener(map_name, keys)`` for each change a late update (one its sender
        wrote in the epoch we just left) made to the previous document (see ``receive``)."""
        self._late_listeners.append(listener)

    def on_ahead_arrived(self, listener: AheadListener) -> None:
        """Call ``listener(previous, keys)`` after ``install`` with the entries peers' parts
        sent ahead changed in the new document before it was installed."""
        self._ahead_listeners.append(listener)

    def on_ahead_applied(self, listener: AheadListener) -> None:
        """Call ``listener(building, keys)`` as each part sent ahead is applied to the
        document being built (``building``), with the entries it changed there."""
        self._ahead_applied_listeners.append(listener)

    def prepare(self, epoch: int) -> EpochDoc:
        """A fresh document for ``epoch`` to build beside the current one, then ``install``.

        Its update gate follows it from the start, so installing it copies nothing.
        """
        doc = EpochDoc(self.name, epoch)
        self._prepared = (doc, self._new_gate(doc))
        self._ahead_ready, self._ahead_queue, self._ahead_keys = False, [], set()
        self._sent_ahead = None
        return doc

    def send_ahead(self) -> None:
        """Send this instance's own part of the document being built to every peer that
        rotates in-band, before the install (``{"ahead": N, "part": ...}``).

        A peer applies it to the document it builds for the same epoch, so at the install
        only what changed since crosses the wire and is applied: integrating a part (the
        writes of the last seconds) is the costly step of a rotation, and it is then done
        away from the moment every instance switches. A peer that could not use it (no
        build of that epoch) gets those items with the SYNC_STEP1/2 after the install.
        """
        if self._prepared is None or self._sent_ahead is not None:
            return
        doc = self._prepared[0]
        told: set[str | None] = set()
        self._sent_ahead = (doc, doc.own_clock(), told)
        own = doc.own_update()
        if own == EMPTY_UPDATE:
            return
        frame = ahead_frame(doc.epoch, own)
        for conn in self.connections:
            if conn.rotates_in_band and not conn.external and (
                    conn.peer is None or conn.peer not in told):
                conn.push_control(frame)
                told.add(conn.peer)

    def receive_ahead(self, conn: YConnection, epoch: int, update: bytes) -> None:
        """A peer's own part of ``epoch``'s document, sent ahead of the install.

        Applied to the document being built for that epoch once its build has written
        every shared item (``ahead_ready``; queued until then), checked by that
        document's gate. Dropped when no build of that epoch is under way: the
        SYNC_STEP1/2 after the install brings it. A bad part closes ``conn``.
        """
        if conn.external or self._prepared is None or self._prepared[0].epoch != epoch:
            return
        if not self._ahead_ready:
            if len(self._ahead_queue) < MAX_QUEUED_AHEAD:
                self._ahead_queue.append((conn, update))
            return
        self._apply_ahead(conn, update)

    def ahead_ready(self) -> None:
        """The build under way wrote every shared item: parts sent ahead may be applied
        (before that, their items could wait in it unchecked for a shared item)."""
        self._ahead_ready = True
        queued, self._ahead_queue = self._ahead_queue, []
        for conn, update in queued:
            self._apply_ahead(conn, update)

    def _apply_ahead(self, conn: YConnection, update: bytes) -> None:
        if self._prepared is None or conn.state is not ConnState.OPEN:
            return
        doc, gate = self._prepared
        started = time.perf_counter()
        changes: list[tuple[str, Any]] = []
        # Observed only while the part is applied: a document being built needs no events.
        subscriptions = [(ymap, ymap.observe(_key_collector(name, changes)))
                         for name, ymap in doc.maps.items()]
        try:
            with collector_paused(len(update) >= BULK_UPDATE_BYTES):
                gate.check(update, doc.doc)
                doc.apply_remote(update, conn)
        except SyncProtocolError as exc:
            if isinstance(exc, UpdateRejected):
                self._metrics.updates_rejected.labels(self.name, exc.reason).inc()
            get_logger().bind(peer=conn.name, doc=self.name).warning(
                "sync_message_rejected", error=str(exc))
            conn.close(str(exc))
            return
        finally:
            for ymap, subscription in subscriptions:
                ymap.unobserve(subscription)
        self._ahead_keys.update(changes)
        self._metrics.apply_seconds.observe(time.perf_counter() - started)
        keys = set(changes)
        for listener in self._ahead_applied_listeners:
            listener(doc, keys)

    def install(self, doc: EpochDoc, left: set[tuple[str, str]] | None = None) -> None:
        """Make ``doc`` current; connections that cannot follow in-band are closed first.

        ``left``: the (map, key)s of the previous document that ``doc`` may lack (left to
        their writer, ``_rotation``); None when any may be missing (a plain rebuild).

        Peers that rotate in-band get ``{"epoch": N}``, then this instance's own part
        of the new document (what only it carried), then our SYNC_STEP1. The old
        document stays readable (``value``) until every peer has answered in the new
        epoch (its SYNC_STEP1 came after its own part), or ``end_overlap``.
        """
        self.end_overlap()
        if self._prepared is not None and self._prepared[0] is doc:
            self.ahead_ready()  # parts still queued: applied now, before anything else
        sent_ahead, told_ahead = (self._sent_ahead[1], self._sent_ahead[2]) if (
            self._sent_ahead is not None and self._sent_ahead[0] is doc) else (0, set())
        ahead_keys, self._ahead_keys, self._sent_ahead = self._ahead_keys, set(), None
        self._ahead_ready = False
        kept = {c for c in self.connections if c.rotates_in_band and not c.external}
        for conn in self.connections - kept:
            conn.close("epoch rotated")
        self.connections = kept
        self._retired = [*self._retired, self.doc.client_ids()][-RETIRED_EPOCHS_KEPT:]
        previous, self.doc = self.doc, doc
        self._awareness = self._new_awareness(doc)
        prepared, self._prepared = self._prepared, None
        self._previous_gate = self._gate  # late updates of the old epoch are checked by it
        if prepared is not None and prepared[0] is doc:
            self._gate = prepared[1]
        else:
            self._gate = self._new_gate(doc)
        self._follow(doc)
        for listener in self._doc_listeners:
            listener(doc)
        self._synced = set()
        self.previous = previous
        self._left = set(left) if left is not None else None
        if ahead_keys:
            for ahead_listener in self._ahead_listeners:
                ahead_listener(previous, ahead_keys)
        if kept:
            frame, step1 = epoch_frame(doc.epoch), self.sync_step1()
            parts: dict[int, bytes | None] = {}

            def part(since: int) -> bytes | None:
                if since not in parts:
                    own = doc.own_update(since=since)
                    parts[since] = update_message(own) if own != EMPTY_UPDATE else None
                return parts[since]

            told: set[str | None] = set()
            for conn in kept:
                conn.push_control(frame)
                # A peer told ahead lacks only what we wrote since; any other, all of it.
                carried = part(sent_ahead if conn.peer in told_ahead else 0)
                if carried is not None and (conn.peer is None or conn.peer not in told):
                    conn.push(carried)  # once per peer instance, like every relay
                    told.add(conn.peer)
                conn.push(step1)
        self._announce_links()  # after the epoch frame: anything it sends is of the new doc
        self._check_overlap()  # no peer to wait for: it ends now

    def value(self, map_name: str, key: str) -> Any:
        """``key``'s value in the current document, or while the rotation overlaps, in the
        previous one if the current has not got it yet (its writer's copy is on the way)."""
        value = self.doc.maps[map_name].get(key)
        if value is not None or self.previous is None or (map_name, key) in self._deleted:
            return value
        return self.previous.maps[map_name].get(key)

    def end_overlap(self) -> None:
        """Forget the previous epoch's document; listeners carry what never arrived."""
        previous, self.previous = self.previous, None
        deleted, self._deleted = self._deleted, set()
        left, self._left = self._left, None
        self._previous_gate = None
        if previous is not None:
            for listener in self._overlap_listeners:
                listener(previous, deleted, left)

    def _check_overlap(self) -> None:
        if self.previous is not None and all(
            c in self._synced for c in self.connections if not c.external
        ):
            self.end_overlap()

    def _note_deleted(self, map_name: str, keys: dict[str, Any], remote: bool) -> None:
        if self._late_changes is not None:  # a change of the previous document: see receive
            self._late_changes.append((map_name, keys))
            return
        if self.previous is None:
            return
        for key, change in keys.items():
            if change.get("action") == "delete":
                self._deleted.add((map_name, key))

    def is_stale(self, conn: YConnection) -> bool:
        """True while ``conn``'s peer is still in an older epoch than ours."""
        return conn.peer_epoch is not None and conn.peer_epoch < self.doc.epoch

    def receive(self, conn: YConnection, message: bytes) -> None:
        """Handle one y-protocols message from ``conn`` (replies are pushed to it).

        A message its peer sent before it rotated into our epoch (``is_stale``) belongs
        to the previous document. An update among them was in flight when we rotated:
        it is checked by the previous document's gate, applied to that document, and the
        listeners (``on_late_change``) write what it changed into the current one, so it
        does not wait one more delay for its writer's part. Other such messages (a
        SYNC_STEP1 about the old document), and any once the overlap has ended, are
        dropped: the SYNC_STEP1/2 of the new epoch brings what they would have.

        Raises:
            SyncProtocolError: the message is malformed, or its update cannot be applied
                or breaks the schema (``UpdateRejected``); ``conn`` is then CLOSED.
        """
        if not self.is_stale(conn):
            for reply in conn.receive_message(message):
                conn.push(reply)
            return
        previous, gate = self.previous, self._previous_gate
        if previous is None or gate is None or conn.peer_epoch != previous.epoch:
            return
        try:
            update = update_of(message)
            if update is None or update == EMPTY_UPDATE:
                return
            self._apply_late(previous, gate, update, conn)
        except SyncProtocolError as exc:
            conn.close(str(exc))
            raise

    def _apply_late(self, previous: EpochDoc, gate: UpdateGate, update: bytes,
                    origin: YConnection) -> None:
        started = time.perf_counter()
        self._late_changes = []
        try:
            with collector_paused(len(update) >= BULK_UPDATE_BYTES):
                try:
                    gate.check(update, previous.doc)
                except UpdateRejected as exc:
                    self._metrics.updates_rejected.labels(self.name, exc.reason).inc()
                    raise
                previous.apply_remote(update, origin)
            changes = self._late_changes
        finally:
            self._late_changes = None
        self._metrics.apply_seconds.observe(time.perf_counter() - started)
        for map_name, keys in changes:
            if self._left is not None:
                self._left.update((map_name, key) for key in keys)
            for listener in self._late_listeners:
                listener(map_name, keys)

    def on_peer_epoch(self, conn: YConnection, epoch: int) -> None:
        """``conn``'s peer rotated into ``epoch``; follow it if that is newer than ours."""
        conn.peer_epoch = max(epoch, conn.peer_epoch or 0)
        if epoch > self.doc.epoch and self.on_epoch_request is not None:
            self.on_epoch_request(epoch)

    def attach(self, conn: YConnection) -> None:
        """Start relaying document changes to ``conn``."""
        self.connections.add(conn)
        self.on_peer_identified(conn)

    def detach(self, conn: YConnection) -> None:
        """Stop relaying to ``conn`` (idempotent)."""
        if conn in self.connections:
            self.connections.discard(conn)
            self._synced.discard(conn)
            self._announce_links()
            self._check_overlap()

    def on_peer_identified(self, conn: YConnection) -> None:
        """``conn.peer`` became known: tell it (and, if the set grew, everyone) our links."""
        if conn.peer is None or conn.external or conn not in self.connections:
            return
        if not self._announce_links():
            conn.push_control(links_frame(self._linked))

    def on_peer_links(self, conn: YConnection, links: frozenset[str]) -> None:
        """Record the instances ``conn``'s peer says it is directly linked to."""
        conn.peer_links = links

    def linked_peers(self) -> frozenset[str]:
        """Instances this document is exchanged with directly now (writer ids)."""
        return self._linked

    def _announce_links(self) -> bool:
        """Send our links to every peer if they changed; True if they did."""
        linked = frozenset(c.peer for c in self.connections if c.peer is not None)
        if linked == self._linked:
            return False
        lost = self._linked - linked
        self._linked = linked
        frame = links_frame(linked)
        step1 = self.sync_step1() if lost else None
        for conn in self.connections:
            if conn.peer is not None:
                conn.push_control(frame)
                if step1 is not None:
                    conn.push(step1)  # they may have skipped changes for the lost link's sake
        return True

    # -- DocEndpoint -------------------------------------------------------------

    def sync_step1(self) -> bytes:
        return _create_step1(self.doc.doc)

    def answer_step1(self, state_vector: bytes, origin: YConnection) -> bytes:
        known = decode_state_vector(state_vector)
        if any(client in retired for retired in self._retired for client in known):
            raise SyncProtocolError(f"{origin.name} holds a document from an older epoch")
        answer = _STEP2_HEADER + write_message(self.doc.diff(state_vector))
        if self.previous is not None and not origin.external:
            self._synced.add(origin)  # its own part of this epoch came before this
            self._check_overlap()
        return answer

    def apply_remote(self, update: bytes, origin: YConnection) -> None:
        """Check ``update`` against the schema, then apply it.

        Raises:
            UpdateRejected: the update breaks the schema or a size limit; nothing
                of it was applied (the connection is then closed).
            SyncProtocolError: the update does not decode.
        """
        started = time.perf_counter()
        with collector_paused(len(update) >= BULK_UPDATE_BYTES):
            try:
                self._gate.check(update, self.doc.doc)
            except UpdateRejected as exc:
                self._metrics.updates_rejected.labels(self.name, exc.reason).inc()
                raise
            self.doc.apply_remote(update, origin)
        self._metrics.apply_seconds.observe(time.perf_counter() - started)

    def on_awareness(self, payload: bytes, origin: YConnection) -> None:
        try:
            self._awareness.apply_awareness_update(payload, origin)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise SyncProtocolError(f"bad awareness update: {exc!r}") from exc
        message = create_awareness_message(payload)
        for conn in self.connections:
            if conn.external:
                conn.push(message)

    def awareness_snapshot(self) -> bytes | None:
        states = list(self._awareness.states)
        return self._awareness.encode_awareness_update(states) if states else None

    def measured(self, size: int) -> None:
        """The current document's encoded size, just measured (bounds later updates)."""
        self._gate.measured(size)

    # -- internals ---------------------------------------------------------------

    def _follow(self, doc: EpochDoc) -> None:
        """Relay ``doc``'s changes while it is current (never a late change of a previous
        document: every peer is in the new epoch then), and note its deletions."""
        doc.on_update(lambda update, origin: self._relay(update, origin)
                      if doc is self.doc else None)
        doc.on_map_change(self._note_deleted)

    def _new_gate(self, doc: EpochDoc) -> UpdateGate:
        gate = UpdateGate(doc.doc, DOC_MAPS[doc.name], **self._limits)
        doc.on_update(lambda update, _origin: gate.follow(update))
        return gate

    def _relay(self, update: bytes, origin: object | None) -> None:
        targets = relay_targets(self.connections, origin=origin)
        if targets:
            message = update_message(update)
            for conn in targets:
                conn.push(message)

    @staticmethod
    def _new_awareness(doc: EpochDoc) -> Awareness:
        awareness = Awareness(doc.doc)
        awareness.set_local_state(None)  # the server itself is not a participant
        return awareness


def _key_collector(map_name: str, into: list[tuple[str, Any]]) -> Callable[[MapEvent], None]:
    def observer(event: MapEvent) -> None:  # one parameter: see EpochDoc._map_observer
        into.extend((map_name, key) for key in _changed_keys(event))

    return observer


def live_connections(hubs: Iterable[DocHub]) -> int:
    """Total connections attached to ``hubs`` (for tests and /health)."""
    return sum(len(hub.connections) for hub in hubs)
