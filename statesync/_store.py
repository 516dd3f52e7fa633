"""``SessionStore``: the small interface ``proxy/`` reads and writes state through.

Rules / theory of operation
---------------------------
Schema (a stock Yjs client can read it; every value is a plain JSON object, so
``doc.getMap('sessions').get(id).upstream`` works):

* ``sessions`` doc, map ``sessions``: ``id -> {upstream, created, last_seen,
  attributes, ts, by}``. ``ts``/``by`` are the write time and writer; see repair.
* ``sessions`` doc, map ``upstreams``: ``name -> {state, until, reporter, ts}``.
* ``usage`` doc, map ``usage``: ``"{writer}|{bucket}|{key}" -> {key, b, s, w, r, t}``.
  One entry per *writer* (instance id + a random incarnation suffix) per bucket of
  ``s`` seconds (``b`` is its index: it holds ``[b*s, (b+1)*s)``) per client key,
  holding that writer's net counts: a PN-counter whose value is the
  sum of the entries. Deltas may be negative (a corrected estimate); no separate
  P and N halves are needed because only its writer ever sets an entry, so the
  entry never has to be merged with another writer's copy. A flush is a
  read-modify-write of our own entry only, never of a shared number. The
  incarnation suffix keeps a restarted process from fighting its previous life.
* ``sessions`` doc, map ``objects``: object id -> upstream (``_objects``).
* both docs, map ``meta``: ``writer -> {ts, instance}`` heartbeats, used for
  ``skyroute_sync_lag_seconds`` (origin write time to local apply), and for when each
  writer was last heard from (``heard_from``, local receipt time: no clock skew).
* ``usage`` doc, map ``shares``: ``writer -> {w, k: {key: {d, g: {writer: n}}}}``, each
  writer's rate-limit shares (``routing.LimitShares.wire``), written only by that
  writer (``publish_shares``, on the next flush) and re-asserted in a new epoch.

Usage window: a bucket counts until ``usage_window_s`` (60 s) after it ends, so a
request counts for 60 to 61 s with 1 s buckets: never less than the window (a limit
errs on the strict side), and at most a second more. ``usage_buckets`` gives each
bucket with its end, so a refusal can say exactly when enough of the oldest counts
leave the window. Entries without ``s`` come from writers that used 10 s buckets and
count as such. Our own pending deltas count at once, before they are flushed.

Batching: ``add_usage`` only adds to a dict; ``flush`` (every ``flush_interval_s``)
writes all pending deltas and a heartbeat in one transaction, and deletes our own
entries ``USAGE_DELETE_AFTER_S`` after they left the window (rotation drops the rest).
``touch`` writes only when the stored ``last_seen`` is ``TOUCH_WRITE_EVERY_S`` old, and
keeps the exact time in a local overlay; ``pin`` and ``report_upstream`` write at once
(they are rare and their latency is what peers wait for).

Repair after merges (rotation carries, restarts): when a remote change sets one of
our own usage entries to something other than our total, we rewrite it on the next
flush (the owner re-asserts). When a remote change replaces a session, the value both
should hold is written back if it differs (``_pins.merged``): the pin by ``_pins``'
rule (a later move wins, else the earliest pin by hybrid logical clock), the rest
last-writer-wins by ``(ts, by)``, never by Yjs client-id order.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import math
from collections import deque
from typing import Any, Final, final

from skyroute.routing import UpstreamState

from ._doc import DocHub, EpochDoc
from ._metrics import SyncMetrics, get_logger
from ._objects import object_entry_is_live
from ._pins import HybridClock, PinStamp, merged, next_pin
from ._rotation import SETTLE_S, Carry, CarryRules
from ._types import Clock, Session, SyncSettings, UpstreamReport, Usage, UsageBucket

USAGE_BUCKET_S: Final = 1.0
"""How finely usage is counted: a request counts at most this much longer than the
window, and a refusal's Retry-After is exact to it. One entry per second per busy
key and writer is the cost, small next to the flushes that rewrite it."""
HISTORY_S: Final = 10.0
"""Recent values of an entry are kept this long: a rotation asks what an entry held
``SETTLE_S`` before its epoch began, while it builds (a few seconds)."""
USAGE_DELETE_AFTER_S: Final = 30.0
"""A writer deletes its own usage entry this long after the entry left the window, so a
peer whose clock is up to 30 s behind still counts it for the whole window; the document
then holds about a window's worth of entries per key and writer, not an epoch's."""
LEGACY_BUCKET_S: Final = 10.0
"""Bucket size of entries written without ``s`` (by an older skyroute)."""
TOUCH_WRITE_EVERY_S: Final = 30.0
"""``last_seen`` only matters against a TTL of hours; 30 s keeps touches cheap."""
CLEAR_STATES: Final = frozenset({UpstreamState.HEALTHY, "up", "ok"})
"""Reporting one of these removes the upstream's report (``healthy`` is routing's word;
``up`` and ``ok`` are what other writers of the document may say)."""

_BucketKey = tuple[str, int]  # (client key name, bucket index)
_Slot = tuple[int, float, str]  # (bucket index, bucket seconds, writer) of a usage entry


def _written_at(map_name: str, value: Any) -> float | None:
    """When an entry was last written, by its own fields; None if it does not say."""
    if not isinstance(value, dict):
        return None
    if map_name == "usage":
        slot = _slot_of(value)  # rewritten by its writer until its bucket ends
        return (slot[0] + 1) * slot[1] if slot is not None else None
    ts = value.get("ts")
    return float(ts) if isinstance(ts, int | float) and math.isfinite(ts) else None


def _writer_of(map_name: str, value: Any) -> str | None:
    """The writer id that wrote an entry last, if the entry names one."""
    writer = value.get("w" if map_name in ("usage", "shares") else "by") \
        if isinstance(value, dict) else None
    return writer if isinstance(writer, str) else None


IN_FLIGHT_CARRIED: Final = frozenset({"sessions", "upstreams", "objects"})
"""Maps whose in-flight writes a rotation carries on receipt (``_carry_in_flight``)."""


def _stamp(map_name: str, value: Any) -> tuple[float, str]:
    """(write time, writer) of an entry: the later one wins (last writer wins)."""
    written = _written_at(map_name, value)
    writer = value.get("reporter" if map_name == "upstreams" else "by", "") \
        if isinstance(value, dict) else ""
    return (written if written is not None else -math.inf, str(writer))


def bucket_of(now: float) -> int:
    """Index of the usage bucket holding ``now``."""
    return math.floor(now / USAGE_BUCKET_S)


def _slot_of(value: Any) -> _Slot | None:
    """Where a usage entry counts, or None when it is malformed."""
    try:
        size = float(value.get("s", LEGACY_BUCKET_S))
        slot = (int(value["b"]), size, str(value["w"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return slot if size > 0 else None


@final
class SessionStore:
    """Sessions, usage counters and health gossip shared by all instances."""

    def __init__(
        self,
        *,
        settings: SyncSettings,
        writer_id: str,
        sessions: DocHub,
        usage: DocHub,
        clock: Clock,
        metrics: SyncMetrics,
    ) -> None:
        self._settings = settings
        self.writer_id = writer_id
        self._sessions = sessions
        self._usage = usage
        self._clock = clock
        self._metrics = metrics
        self._log = get_logger().bind(instance=settings.instance_id)
        self._window_s = settings.usage_window_s
        # Per client key: bucket -> counts. Pending deltas are not yet flushed; own
        # totals are what our entries say; the view is every writer's entries.
        self._pending: dict[str, dict[int, list[int]]] = {}
        self._own: dict[str, dict[int, tuple[int, int]]] = {}
        self._dirty: set[_BucketKey] = set()
        self._view: dict[str, dict[_Slot, tuple[int, int]]] = {}
        self._pruned_at = 0.0
        self._expiry: deque[tuple[float, str]] = deque()  # (delete at, our entry's map key)
        self._touched: dict[str, float] = {}
        self._repairs: dict[str, Any] = {}
        self._hlc = HybridClock()
        self._shares: dict[str, Any] | None = None  # our published shares entry
        self._shares_dirty = False
        self._heard: dict[str, float] = {}  # writer -> when we last received its write
        self._history: dict[tuple[str, str], list[tuple[float, Any]]] = {}
        self._history_pruned_at = 0.0
        self._session_count = 0  # entries in the sessions map; see _count_sessions
        self._ahead_suspects: set[str] = set()  # see _note_ahead
        for hub in (sessions, usage):
            hub.on_new_doc(self._attach)
            hub.on_overlap_end(self._reconcile)
            hub.on_late_change(functools.partial(self._carry_in_flight, hub))
            hub.on_ahead_applied(functools.partial(self._note_ahead, hub))
            hub.on_ahead_arrived(functools.partial(self._check_ahead, hub))
            self._attach(hub.doc)

    def __repr__(self) -> str:
        return f"<SessionStore writer={self.writer_id} pending={len(self._pending)}>"

    @property
    def session_count(self) -> int:
        """Entries in the sessions map now (live or past their TTL), in O(1)."""
        return self._session_count

    # -- sessions ----------------------------------------------------------------

    def get(self, session_id: str, *, now: float) -> Session | None:
        """Return the session, or None if it is absent or idle longer than the TTL."""
        value = self._sessions.value("sessions", session_id)
        session = Session.from_wire(session_id, value, observed_at=now)
        if session is None:
            return None
        touched = self._touched.get(session_id)
        last_seen = max(session.last_seen, touched) if touched is not None else session.last_seen
        if now - last_seen > self._settings.session_ttl_s:
            return None
        if last_seen != session.last_seen:
            session = Session(
                id=session.id,
                upstream=session.upstream,
                created=session.created,
                last_seen=last_seen,
                attributes=session.attributes,
            )
        return session

    def pin(
        self,
        session_id: str,
        upstream: str,
        *,
        now: float,
        moved_from: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> bool:
        """Pin the session to ``upstream`` (creating it), visible to peers at once.

        Args:
            moved_from: the upstream the caller saw the session pinned to when it
                chose ``upstream`` instead (an explicit move), or None if it saw no
                pin. A pin made without seeing one does not replace an earlier pin
                (``_pins``): the session is then only touched.
            attributes: merged into the session's in the same write.

        Returns:
            True if the pin was written, False if an earlier pin stays.
        """
        stored = self._sessions.value("sessions", session_id)
        expired = stored is not None and self.get(session_id, now=now) is None
        stamp = next_pin(
            stored, moved_from=moved_from, expired=expired, at=self._hlc.now(now), by=self.writer_id
        )
        if stamp is None:
            self._write_session(session_id, now=now, attributes=attributes)
            return False
        self._write_session(
            session_id, now=now, upstream=upstream, attributes=attributes, pin=stamp
        )
        return True

    def touch(self, session_id: str, *, now: float) -> None:
        """Record activity; creates the session unpinned if absent. Cheap: see module doc."""
        current = self.get(session_id, now=now)
        stale = current is None or not 0.0 <= now - current.last_seen < TOUCH_WRITE_EVERY_S
        if stale:
            self._write_session(session_id, now=now)
        else:
            self._touched[session_id] = now

    def set_attributes(self, session_id: str, attributes: dict[str, str], *, now: float) -> None:
        """Merge ``attributes`` into the session's (small string values only)."""
        self._write_session(session_id, now=now, attributes=attributes)

    def _write_session(
        self,
        session_id: str,
        *,
        now: float,
        upstream: str | None = None,
        attributes: dict[str, str] | None = None,
        pin: PinStamp | None = None,
    ) -> None:
        current = self.get(session_id, now=now)
        attrs = dict(current.attributes) if current is not None else {}
        attrs.update(attributes or {})
        value: dict[str, Any] = {
            "upstream": upstream if upstream is not None else (current and current.upstream),
            "created": current.created if current is not None else now,
            "last_seen": now,
            "attributes": attrs,
            "ts": now,
            "by": self.writer_id,
        }
        stored = self._sessions.value("sessions", session_id)
        if pin is not None:
            value["pin"] = pin.to_wire()
        elif current is not None and isinstance(stored, dict) and "pin" in stored:
            value["pin"] = stored["pin"]  # a touch keeps the pin's stamp as it is
        self._touched.pop(session_id, None)
        self._sessions.doc.maps["sessions"][session_id] = value

    # -- usage -------------------------------------------------------------------

    def add_usage(self, key_name: str, *, requests: int = 0, tokens: int = 0, now: float) -> None:
        """Count usage for ``key_name``; batched, written by the next ``flush``."""
        delta = self._pending.setdefault(key_name, {}).setdefault(bucket_of(now), [0, 0])
        delta[0] += requests
        delta[1] += tokens

    def usage(self, key_name: str, *, now: float) -> Usage:
        """Usage of ``key_name`` over all instances, in the buckets still in the window."""
        buckets = self.usage_buckets(key_name, now=now)
        return Usage(sum(b.requests for b in buckets), sum(b.tokens for b in buckets))

    def usage_buckets(self, key_name: str, *, now: float) -> list[UsageBucket]:
        """Usage of ``key_name`` over all instances per bucket still in the window, oldest
        first (a bucket is in the window until ``usage_window_s`` after its ``end``)."""
        since = now - self._window_s
        spans: dict[tuple[float, float], list[int]] = {}

        def add(bucket: int, size: float, r: int, t: int) -> None:
            if (bucket + 1) * size > since:
                counts = spans.setdefault((bucket * size, (bucket + 1) * size), [0, 0])
                counts[0] += r
                counts[1] += t

        for (bucket, size, writer), (r, t) in self._view.get(key_name, {}).items():
            if writer != self.writer_id:
                add(bucket, size, r, t)
        for source in (self._own, self._pending):
            for bucket, (r, t) in source.get(key_name, {}).items():
                add(bucket, USAGE_BUCKET_S, r, t)
        return [UsageBucket(start=start, end=end, requests=r, tokens=t)
                for (start, end), (r, t) in sorted(spans.items())]

    def own_usage_buckets(self, key_name: str, *, now: float) -> list[UsageBucket]:
        """This writer's own usage of ``key_name`` per bucket still in the window (exact:
        nothing here waits for sync), oldest first."""
        spans: dict[int, list[int]] = {}
        for source in (self._own, self._pending):
            for bucket, (r, t) in source.get(key_name, {}).items():
                if self._in_window(bucket, USAGE_BUCKET_S, now):
                    counts = spans.setdefault(bucket, [0, 0])
                    counts[0] += r
                    counts[1] += t
        return [UsageBucket(start=b * USAGE_BUCKET_S, end=(b + 1) * USAGE_BUCKET_S,
                            requests=r, tokens=t) for b, (r, t) in sorted(spans.items())]

    def usage_by_writer(self, key_name: str, *, now: float) -> dict[str, int]:
        """Requests of ``key_name`` in the window per other writer (what its counters say)."""
        used: dict[str, int] = {}
        for (bucket, size, writer), (r, _) in self._view.get(key_name, {}).items():
            if writer != self.writer_id and self._in_window(bucket, size, now):
                used[writer] = used.get(writer, 0) + r
        return used

    # -- rate-limit shares ---------------------------------------------------------------

    def publish_shares(self, entry: dict[str, Any]) -> None:
        """Publish our rate-limit shares entry (written by the next flush, if it changed)."""
        if entry != self._shares:
            self._shares = entry
            self._shares_dirty = True

    def peer_shares(self) -> dict[str, Any]:
        """Every other writer's published shares entry, by writer id (values unchecked)."""
        return {w: v for w, v in self._usage.doc.maps["shares"].items() if w != self.writer_id}

    def heard_from(self) -> dict[str, float]:
        """When each other writer's last write reached us (local wall clock)."""
        return dict(self._heard)

    def _flush_shares(self) -> bool:
        if not self._shares_dirty or self._shares is None:
            return False
        self._usage.doc.maps["shares"][self.writer_id] = self._shares
        self._shares_dirty = False
        return True

    def _in_window(self, bucket: int, size: float, now: float) -> bool:
        return (bucket + 1) * size > now - self._window_s

    def flush(self) -> bool:
        """Write pending counter deltas, repairs and a heartbeat; True if anything was written.

        Also keeps the sessions map under ``max_sessions`` (see ``_evict_sessions``).
        """
        now = self._clock()
        if now - self._history_pruned_at >= 1.0:
            self._history_pruned_at = now
            self._prune_history(now)
        evicted = self._evict_sessions(now) | self._flush_shares()
        pending, self._pending = self._pending, {}
        for key_name, buckets in pending.items():
            own = self._own.setdefault(key_name, {})
            for bucket, (r, t) in buckets.items():
                if bucket not in own:  # a new entry: delete it once nobody counts it
                    self._expiry.append((
                        (bucket + 1) * USAGE_BUCKET_S + self._window_s + USAGE_DELETE_AFTER_S,
                        f"{self.writer_id}|{bucket}|{key_name}"))
                old_r, old_t = own.get(bucket, (0, 0))
                own[bucket] = (old_r + r, old_t + t)
                self._dirty.add((key_name, bucket))
        repairs, self._repairs = self._repairs, {}
        if repairs:
            smap = self._sessions.doc.maps["sessions"]
            with self._sessions.doc.doc.transaction():
                for session_id, value in repairs.items():
                    smap[session_id] = value
        expired = []
        while self._expiry and self._expiry[0][0] <= now:
            expired.append(self._expiry.popleft()[1])
        if not self._dirty and not expired:
            return bool(repairs) or evicted
        doc = self._usage.doc
        with doc.doc.transaction():
            umap = doc.maps["usage"]
            for map_key in expired:
                if map_key in umap:
                    del umap[map_key]
            for key_name, bucket in self._dirty:
                r, t = self._own.get(key_name, {}).get(bucket, (0, 0))
                umap[f"{self.writer_id}|{bucket}|{key_name}"] = {
                    "key": key_name,
                    "b": bucket,
                    "s": USAGE_BUCKET_S,
                    "w": self.writer_id,
                    "r": r,
                    "t": t,
                }
            self._heartbeat(doc, now)
        self._dirty.clear()
        self._prune(now)
        return True

    def _evict_sessions(self, now: float) -> bool:
        """Delete the least recently seen sessions while there are over ``max_sessions``.

        A tenth of the cap more than needed goes at once, so a stream of new
        session ids costs one scan per that many sessions, not one per session.
        """
        cap = self._settings.max_sessions
        over = self._session_count - cap
        if over <= 0:
            return False
        smap = self._sessions.doc.maps["sessions"]

        def last_seen(item: tuple[str, Any]) -> float:
            session = Session.from_wire(item[0], item[1], observed_at=now)
            seen = session.last_seen if session is not None else -math.inf
            return max(seen, self._touched.get(item[0], -math.inf))

        victims = heapq.nsmallest(over + cap // 10, list(smap.items()), key=last_seen)
        with self._sessions.doc.doc.transaction():
            for session_id, _ in victims:
                del smap[session_id]
                self._touched.pop(session_id, None)
        self._metrics.sessions_evicted.inc(len(victims))
        self._log.warning("sync_sessions_evicted", count=len(victims), max_sessions=cap)
        return True
    def _prune(self, now: float) -> None:
        """Forget counts that left the window (once per bucket: usage reads stay short)."""
        if now - self._pruned_at < USAGE_BUCKET_S:
            return
        self._pruned_at = now
        for key_name, own in list(self._own.items()):
            own = {b: v for b, v in own.items() if self._in_window(b, USAGE_BUCKET_S, now)}
            if own:
                self._own[key_name] = own
            else:
                del self._own[key_name]
        for key_name, view in list(self._view.items()):
            view = {slot: v for slot, v in view.items() if self._in_window(slot[0], slot[1], now)}
            if view:
                self._view[key_name] = view
            else:
                del self._view[key_name]

    def heartbeat(self) -> None:
        """Write a heartbeat into both documents (keeps lag measured when idle)."""
        now = self._clock()
        for hub in (self._sessions, self._usage):
            with hub.doc.doc.transaction():
                self._heartbeat(hub.doc, now)

    def _heartbeat(self, doc: EpochDoc, now: float) -> None:
        doc.maps["meta"][self.writer_id] = {"ts": now, "instance": self._settings.instance_id}

    # -- health gossip -------------------------------------------------------------

    def report_upstream(
        self, upstream: str, state: str, *, until: float | None, now: float
    ) -> None:
        """Tell every instance ``upstream`` is in ``state`` until ``until`` (None: until cleared).

        Reporting ``up``/``ok``/``healthy`` removes the report.
        """
        umap = self._sessions.doc.maps["upstreams"]
        if state in CLEAR_STATES:
            if upstream in umap:
                del umap[upstream]
            return
        umap[upstream] = {
            "state": state,
            "until": until,
            "reporter": self._settings.instance_id,
            "ts": now,
        }

    def upstream_reports(self, *, now: float) -> dict[str, UpstreamReport]:
        """Reports still in force at ``now``, by upstream name."""
        result: dict[str, UpstreamReport] = {}
        for name, value in self._sessions.doc.maps["upstreams"].items():
            report = UpstreamReport.from_wire(value)
            if report is not None and (report.until is None or report.until > now):
                result[name] = report
        return result

    # -- rotation and observers -------------------------------------------------------

    def keep(self, map_name: str, key: str, value: Any) -> bool:
        """Whether an entry is carried into the next epoch's document (False if malformed).

        Never raises: one odd entry must not stop a rotation.
        """
        try:
            return self._keep(map_name, key, value, now=self._clock(), overlay=True)
        except (ValueError, TypeError, OverflowError, AttributeError):
            return False

    def carry_rules(self, *, start: float, linked: frozenset[str]) -> CarryRules:
        """How a rotation starting at ``start`` carries each entry (``_rotation``).

        An entry's settled value is what it held at ``start - SETTLE_S`` (from its
        write time, and the recent history for an entry written since): the same on
        every instance. It is shared if it is still kept at ``start``. A value written
        since goes on top, by its writer (``by``, or ``w`` for usage): left to that
        writer if it is one of the ``linked`` instances, else written by us.
        """
        cutoff = start - SETTLE_S

        def split(map_name: str, key: str, value: Any) -> tuple[Any, Carry]:
            try:
                settled = self._settled_value(map_name, key, value, cutoff)
                shared = settled if settled is not None and self._keep(
                    map_name, key, settled, now=start, overlay=False) else None
                if shared is not None and shared == value:
                    return shared, Carry.SHARED
                if not self._keep(map_name, key, value, now=self._clock(), overlay=True):
                    return shared, Carry.DROP
                writer = _writer_of(map_name, value)
                written = _written_at(map_name, value)
                if (written is not None and written >= cutoff and writer in linked
                        and writer != self.writer_id):
                    return shared, Carry.WRITER
                return shared, Carry.OWN
            except (ValueError, TypeError, OverflowError, AttributeError):
                return None, Carry.DROP

        return CarryRules(split)

    def _settled_value(self, map_name: str, key: str, value: Any, cutoff: float) -> Any:
        """What the entry held at ``cutoff`` (None: nothing, or unknown)."""
        written = _written_at(map_name, value)
        if written is None or written < cutoff:
            return value
        best: tuple[float, Any] | None = None
        for at, old in self._history.get((map_name, key), ()):
            if at < cutoff and (best is None or at >= best[0]):
                best = (at, old)
        return best[1] if best is not None else None

    def _remember(self, map_name: str, key: str, change: dict[str, Any]) -> None:
        """Keep an entry's recent values (``_settled_value``), the one before them first."""
        history = self._history.get((map_name, key))
        if history is None:
            old = change.get("oldValue")
            written = _written_at(map_name, old) if old is not None else None
            history = self._history[map_name, key] = [
                (written if written is not None else -math.inf, old)]
        new = change.get("newValue") if change.get("action") != "delete" else None
        written = _written_at(map_name, new) if new is not None else None
        history.append((written if written is not None else self._clock(), new))

    def _prune_history(self, now: float) -> None:
        """Forget values older than ``HISTORY_S`` but the last of them."""
        horizon = now - HISTORY_S
        for entry, history in list(self._history.items()):
            older = [i for i, (at, _) in enumerate(history) if at < horizon]
            if len(older) == len(history):
                del self._history[entry]
            elif older:
                del history[:older[-1]]

    def _keep(self, map_name: str, key: str, value: Any, *, now: float, overlay: bool) -> bool:
        if map_name == "sessions":
            session = Session.from_wire(key, value, observed_at=now)
            if session is None:
                return False
            touched = self._touched.get(key, 0.0) if overlay else 0.0
            return now - max(session.last_seen, touched) <= self._settings.session_ttl_s
        if map_name == "upstreams":
            report = UpstreamReport.from_wire(value)
            if report is None:
                return False
            if report.until is not None:
                return report.until > now
            ts = value.get("ts", now)
            return isinstance(ts, int | float) and now - ts <= self._settings.session_ttl_s
        if map_name == "usage":
            slot = _slot_of(value) if isinstance(value, dict) else None
            return slot is not None and self._in_window(slot[0], slot[1], now)
        if map_name == "objects":
            return object_entry_is_live(value, now)
        if map_name == "shares":  # writers silent for a session TTL are gone for good
            return key == self.writer_id or now - self._heard.get(key, -math.inf) <= (
                self._settings.session_ttl_s)
        return False  # meta: fresh heartbeats are written into the new document

    def _reconcile(self, previous: EpochDoc, deleted: set[tuple[str, str]],
                   left: set[tuple[str, str]] | None) -> None:
        """A rotation's overlap ended: carry what this instance keeps and nobody carried.

        Entries left to their writer (``Carry.WRITER``) normally arrived with the
        writer's own part; one that did not (the writer died, or was cut off just
        then) is written here, once the writer had its chance. Only the entries
        in ``left`` can be missing (None: look at all): the expired ones a rotation
        dropped are not read again.
        """
        hub = self._sessions if previous.name == "sessions" else self._usage
        if left is None:
            left = {(name, key) for name, ymap in previous.maps.items()
                    for key in list(ymap.keys())}
        late = 0
        with hub.doc.doc.transaction():
            for map_name, key in sorted(left - deleted):
                target, old_map = hub.doc.maps.get(map_name), previous.maps.get(map_name)
                if target is None or old_map is None or key in target:
                    continue
                value = old_map.get(key)
                if value is not None and self.keep(map_name, key, value):
                    target[key] = value
                    late += 1
        if late:
            self._metrics.rotation_entries.labels("late").inc(late)
            self._log.info("sync_rotation_carried_late", doc=previous.name, entries=late,
                           hint="their writer's copy did not arrive during the overlap")

    def _carry_in_flight(self, hub: DocHub, map_name: str, keys: dict[str, Any]) -> None:
        """A write a peer sent in the epoch we just left arrived after our rotation (it was
        in flight): write it into the new document now, where it wins by the usual rules,
        instead of waiting one more delay for its writer's part.

        The writer's part carries the same value, so both copies agree. Only sessions,
        upstream reports and objects are carried: a usage or shares entry is rewritten by
        its one writer (and the usage view counts the previous document's change already).
        """
        if map_name not in IN_FLIGHT_CARRIED:
            return
        target = hub.doc.maps[map_name]
        writes: dict[str, Any] = {}
        for key, change in keys.items():
            value = change.get("newValue")
            if change.get("action") == "delete" or not isinstance(value, dict):
                continue  # a deletion: the writer's part (or the next rotation) has it
            held = target.get(key)
            if held == value:
                continue
            if held is not None:
                if map_name == "sessions":
                    value = merged(held, value) or value
                elif _stamp(map_name, held) >= _stamp(map_name, value):
                    continue
            if value != held and self.keep(map_name, key, value):
                writes[key] = value
        if not writes:
            return
        with hub.doc.doc.transaction():
            for key, value in writes.items():
                target[key] = value
        self._metrics.rotation_entries.labels("in_flight").inc(len(writes))

    def _note_ahead(self, hub: DocHub, building: EpochDoc, keys: set[tuple[str, str]]) -> None:
        """A peer's part sent ahead changed these entries of the document being built: note
        the sessions it set otherwise than we hold them now (a write that crossed it),
        to be checked once that document is installed (``_check_ahead``). Usually none:
        the part holds the writes we already received."""
        if hub is not self._sessions:
            return
        building_map, ours = building.maps["sessions"], hub.doc.maps["sessions"]
        for map_name, key in keys:
            if map_name == "sessions" and building_map.get(key) != ours.get(key):
                self._ahead_suspects.add(key)

    def _check_ahead(self, hub: DocHub, previous: EpochDoc, keys: set[tuple[str, str]]) -> None:
        """Peers' parts sent ahead changed these entries of the new document before it was
        installed (and observed): each one that was set otherwise than we held it
        (``_note_ahead``) is treated as a remote change from what the previous document
        held, so a session whose pin should not have moved is repaired."""
        if hub is not self._sessions:
            return
        suspects, self._ahead_suspects = self._ahead_suspects, set()
        changes = {}
        target, old_map = hub.doc.maps["sessions"], previous.maps["sessions"]
        for map_name, key in keys:
            if map_name == "sessions" and key in suspects:
                old, new = old_map.get(key), target.get(key)
                if old != new:
                    changes[key] = {"oldValue": old, "newValue": new}
        if changes:
            self._on_session_change(changes)

    def _attach(self, doc: EpochDoc) -> None:
        if doc.name == "sessions":
            self._session_count = len(doc.maps["sessions"])  # once per document
        if doc.name == "usage":
            # The view is kept: a writer's recent entries reach the new document with
            # its own part, and counting them meanwhile keeps limits exact.
            umap = doc.maps["usage"]
            for value in umap.values():
                self._view_set(value)
            # Re-assert our entries the new document lacks or holds otherwise.
            for key_name, own in self._own.items():
                for bucket, (r, t) in own.items():
                    held = umap.get(f"{self.writer_id}|{bucket}|{key_name}")
                    if not isinstance(held, dict) or (held.get("r"), held.get("t")) != (r, t):
                        self._dirty.add((key_name, bucket))
            held = doc.maps["shares"].get(self.writer_id)
            self._shares_dirty = self._shares is not None and held != self._shares
            cutoff = self._clock() - self._settings.session_ttl_s
            self._touched = {k: v for k, v in self._touched.items() if v >= cutoff}
        doc.on_map_change(self._on_change)

    def _on_change(self, map_name: str, keys: dict[str, Any], remote: bool) -> None:
        if remote and map_name in ("meta", "shares"):
            self._note_heard(keys)
        if map_name != "meta":
            for key, change in keys.items():
                self._remember(map_name, key, change)
        if map_name == "sessions":
            self._count_sessions(keys)
        if map_name == "usage":
            self._on_usage_change(keys, remote)
        elif remote and map_name == "sessions":
            self._on_session_change(keys)
        elif remote and map_name == "meta":
            now = self._clock()
            for writer, change in keys.items():
                value = change.get("newValue")
                if writer != self.writer_id and isinstance(value, dict):
                    ts = value.get("ts")
                    if isinstance(ts, int | float) and 0.0 <= now - ts < 3600.0:
                        self._metrics.lag_seconds.observe(now - ts)

    def _count_sessions(self, keys: dict[str, Any]) -> None:
        """Follow the sessions map's size through its changes, local and remote.

        pycrdt's ``len`` of a map walks every key: at 100,000 sessions it took
        4 ms, and ``flush`` asks for the size every 50 ms (``bench/sessions.py``).
        """
        for change in keys.values():
            action = change.get("action")
            if action == "add":
                self._session_count += 1
            elif action == "delete":
                self._session_count -= 1

    def _on_usage_change(self, keys: dict[str, Any], remote: bool) -> None:
        for change in keys.values():
            value = change.get("newValue")
            if change.get("action") == "delete" or not isinstance(value, dict):
                old = change.get("oldValue")
                slot = _slot_of(old) if isinstance(old, dict) else None
                if slot is not None:
                    self._view.get(str(old.get("key")), {}).pop(slot, None)
                continue
            self._view_set(value)
            if remote and value.get("w") == self.writer_id:
                key_name, bucket = str(value.get("key")), int(value.get("b", 0))
                own = self._own.get(key_name, {})
                if bucket in own and own[bucket] != (
                    int(value.get("r", 0)),
                    int(value.get("t", 0)),
                ):
                    self._dirty.add((key_name, bucket))

    def _note_heard(self, keys: dict[str, Any]) -> None:
        now = self._clock()
        for writer, change in keys.items():
            if writer != self.writer_id and change.get("action") != "delete":
                self._heard[writer] = now

    def _view_set(self, value: Any) -> None:
        slot = _slot_of(value) if isinstance(value, dict) else None
        if slot is None:
            return
        try:
            counts = (int(value.get("r", 0)), int(value.get("t", 0)))
        except (TypeError, ValueError):
            return
        self._view.setdefault(str(value.get("key")), {})[slot] = counts

    def _on_session_change(self, keys: dict[str, Any]) -> None:
        for session_id, change in keys.items():
            old, new = change.get("oldValue"), change.get("newValue")
            stamp = PinStamp.of(new)
            if stamp is not None:
                self._hlc.observe(stamp.at)  # our next pin is stamped after this one
            old_stamp = PinStamp.of(old)
            if old_stamp is not None and stamp is not None and old["upstream"] != new["upstream"]:
                self._metrics.pin_conflicts.inc()  # settled by the rule, whichever way
            repaired = merged(old, new)
            if repaired is not None:
                self._repairs[session_id] = repaired
                self._log.debug("sync_session_repaired", session=session_id)


async def run_flush_loop(store: SessionStore, interval_s: float, heartbeat_s: float) -> None:
    """Flush ``store`` every ``interval_s`` and heartbeat every ``heartbeat_s`` until cancelled."""
    loop = asyncio.get_running_loop()
    next_heartbeat = loop.time()
    while True:
        await asyncio.sleep(interval_s)
        wrote = store.flush()
        if wrote:
            next_heartbeat = loop.time() + heartbeat_s
        elif loop.time() >= next_heartbeat:
            store.heartbeat()
            next_heartbeat = loop.time() + heartbeat_s
