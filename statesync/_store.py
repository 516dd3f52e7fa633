"""``SessionStore``: the small interface ``proxy/`` reads and writes state through.

Rules / theory of operation
---------------------------
Schema (a stock Yjs client can read it; every value is a plain JSON object, so
``doc.getMap('sessions').get(id).upstream`` works):

* ``sessions`` doc, map ``sessions``: ``id -> {upstream, created, last_seen,
  attributes, ts, by}``. ``ts``/``by`` are the write time and writer; see repair.
* ``sessions`` doc, map ``upstreams``: ``name -> {state, until, reporter, ts}``.
* ``usage`` doc, map ``usage``: ``"{writer}|{bucket}|{key}" -> {key, b, w, r, t}``.
  One entry per *writer* (instance id + a random incarnation suffix) per 10 s bucket
  per client key, holding that writer's net counts: a PN-counter whose value is the
  sum of the entries. Deltas may be negative (a corrected estimate); no separate
  P and N halves are needed because only its writer ever sets an entry, so the
  entry never has to be merged with another writer's copy. A flush is a
  read-modify-write of our own entry only, never of a shared number. The
  incarnation suffix keeps a restarted process from fighting its previous life.
* both docs, map ``meta``: ``writer -> {ts, instance}`` heartbeats, used for
  ``skyroute_sync_lag_seconds`` (origin write time to local apply).

Usage window: the sum of the 10 s buckets that overlap the last 60 s, so the window
spans 60-70 s and never under-counts (an ``rpm`` limit errs on the strict side).
Our own pending deltas count at once, before they are flushed.

Batching: ``add_usage`` only adds to a dict; ``flush`` (every ``flush_interval_s``)
writes all pending deltas and a heartbeat in one transaction. ``touch`` writes only
when the stored ``last_seen`` is ``TOUCH_WRITE_EVERY_S`` old, and keeps the exact time
in a local overlay; ``pin`` and ``report_upstream`` write at once (they are rare and
their latency is what peers wait for).

Repair after merges (rotation carries, restarts): when a remote change sets one of
our own usage entries to something other than our total, we rewrite it on the next
flush (the owner re-asserts). When a remote change replaces a session whose
``(ts, by)`` was newer, the newer value is written back: sessions are last-writer-wins
by timestamp, not by Yjs client-id order.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Any, Final, final

from ._doc import DocHub, EpochDoc
from ._metrics import SyncMetrics, get_logger
from ._types import Clock, Session, SyncSettings, UpstreamReport, Usage

USAGE_BUCKET_S: Final = 10.0
USAGE_WINDOW_S: Final = 60.0
TOUCH_WRITE_EVERY_S: Final = 30.0
"""``last_seen`` only matters against a TTL of hours; 30 s keeps touches cheap."""
CLEAR_STATES: Final = frozenset({"up", "ok", "healthy"})
"""Reporting one of these removes the upstream's report."""

_BucketKey = tuple[str, int]  # (client key name, bucket index)


def bucket_of(now: float) -> int:
    """Index of the usage bucket holding ``now``."""
    return math.floor(now / USAGE_BUCKET_S)


def _in_window(bucket: int, now: float) -> bool:
    return (bucket + 1) * USAGE_BUCKET_S > now - USAGE_WINDOW_S


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
        self._pending: dict[_BucketKey, list[int]] = {}
        self._own: dict[_BucketKey, tuple[int, int]] = {}
        self._dirty: set[_BucketKey] = set()
        self._view: dict[str, dict[tuple[int, str], tuple[int, int]]] = {}
        self._touched: dict[str, float] = {}
        self._repairs: dict[str, Any] = {}
        for hub in (sessions, usage):
            hub.on_new_doc(self._attach)
            self._attach(hub.doc)

    def __repr__(self) -> str:
        return f"<SessionStore writer={self.writer_id} pending={len(self._pending)}>"

    # -- sessions ----------------------------------------------------------------

    def get(self, session_id: str, *, now: float) -> Session | None:
        """Return the session, or None if it is absent or idle longer than the TTL."""
        value = self._sessions.doc.maps["sessions"].get(session_id)
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
        attributes: dict[str, str] | None = None,
    ) -> None:
        """Pin the session to ``upstream`` (creating it), visible to peers at once.

        ``attributes``, if given, are merged into the session's in the same write.
        """
        self._write_session(session_id, now=now, upstream=upstream, attributes=attributes)

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
    ) -> None:
        current = self.get(session_id, now=now)
        attrs = dict(current.attributes) if current is not None else {}
        attrs.update(attributes or {})
        value = {
            "upstream": upstream if upstream is not None else (current and current.upstream),
            "created": current.created if current is not None else now,
            "last_seen": now,
            "attributes": attrs,
            "ts": now,
            "by": self.writer_id,
        }
        self._touched.pop(session_id, None)
        self._sessions.doc.maps["sessions"][session_id] = value

    # -- usage -------------------------------------------------------------------

    def add_usage(self, key_name: str, *, requests: int = 0, tokens: int = 0, now: float) -> None:
        """Count usage for ``key_name``; batched, written by the next ``flush``."""
        delta = self._pending.setdefault((key_name, bucket_of(now)), [0, 0])
        delta[0] += requests
        delta[1] += tokens

    def usage(self, key_name: str, *, now: float) -> Usage:
        """Usage of ``key_name`` over all instances in the buckets overlapping the last 60 s."""
        requests = tokens = 0
        for (bucket, writer), (r, t) in self._view.get(key_name, {}).items():
            if writer != self.writer_id and _in_window(bucket, now):
                requests += r
                tokens += t
        for (key, bucket), (r, t) in self._own.items():
            if key == key_name and _in_window(bucket, now):
                requests += r
                tokens += t
        for (key, bucket), (r, t) in self._pending.items():
            if key == key_name and _in_window(bucket, now):
                requests += r
                tokens += t
        return Usage(requests, tokens)

    def flush(self) -> bool:
        """Write pending counter deltas, repairs and a heartbeat; True if anything was written.

        Also keeps the sessions map under ``max_sessions`` (see ``_evict_sessions``).
        """
        now = self._clock()
        evicted = self._evict_sessions(now)
        pending, self._pending = self._pending, {}
        for bkey, (r, t) in pending.items():
            old_r, old_t = self._own.get(bkey, (0, 0))
            self._own[bkey] = (old_r + r, old_t + t)
            self._dirty.add(bkey)
        repairs, self._repairs = self._repairs, {}
        if repairs:
            smap = self._sessions.doc.maps["sessions"]
            with self._sessions.doc.doc.transaction():
                for session_id, value in repairs.items():
                    smap[session_id] = value
        if not self._dirty:
            return bool(repairs) or evicted
        doc = self._usage.doc
        with doc.doc.transaction():
            umap = doc.maps["usage"]
            for key_name, bucket in self._dirty:
                r, t = self._own.get((key_name, bucket), (0, 0))
                umap[f"{self.writer_id}|{bucket}|{key_name}"] = {
                    "key": key_name,
                    "b": bucket,
                    "w": self.writer_id,
                    "r": r,
                    "t": t,
                }
            self._heartbeat(doc, now)
        self._dirty.clear()
        self._own = {k: v for k, v in self._own.items() if _in_window(k[1], now)}
        return True

    def _evict_sessions(self, now: float) -> bool:
        """Delete the least recently seen sessions while there are over ``max_sessions``.

        A tenth of the cap more than needed goes at once, so a stream of new
        session ids costs one scan per that many sessions, not one per session.
        """
        smap = self._sessions.doc.maps["sessions"]
        cap = self._settings.max_sessions
        over = len(smap) - cap
        if over <= 0:
            return False

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
            return self._keep(map_name, key, value)
        except (ValueError, TypeError, OverflowError, AttributeError):
            return False

    def _keep(self, map_name: str, key: str, value: Any) -> bool:
        now = self._clock()
        if map_name == "sessions":
            session = Session.from_wire(key, value, observed_at=now)
            last = max(session.last_seen, self._touched.get(key, 0.0)) if session else 0.0
            return session is not None and now - last <= self._settings.session_ttl_s
        if map_name == "upstreams":
            report = UpstreamReport.from_wire(value)
            if report is None:
                return False
            if report.until is not None:
                return report.until > now
            ts = value.get("ts", now)
            return isinstance(ts, int | float) and now - ts <= self._settings.session_ttl_s
        if map_name == "usage":
            return isinstance(value, dict) and _in_window(int(value.get("b", 0)), now)
        return False  # meta: fresh heartbeats are written into the new document

    def _attach(self, doc: EpochDoc) -> None:
        if doc.name == "usage":
            self._view = {}
            for value in doc.maps["usage"].values():
                self._view_set(value)
            self._dirty.update(self._own)  # re-assert our entries in the new document
            cutoff = self._clock() - self._settings.session_ttl_s
            self._touched = {k: v for k, v in self._touched.items() if v >= cutoff}
        doc.on_map_change(self._on_change)

    def _on_change(self, map_name: str, keys: dict[str, Any], remote: bool) -> None:
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

    def _on_usage_change(self, keys: dict[str, Any], remote: bool) -> None:
        for change in keys.values():
            value = change.get("newValue")
            if change.get("action") == "delete" or not isinstance(value, dict):
                old = change.get("oldValue")
                if isinstance(old, dict):
                    self._view.get(str(old.get("key")), {}).pop(
                        (int(old.get("b", 0)), str(old.get("w"))), None
                    )
                continue
            self._view_set(value)
            if remote and value.get("w") == self.writer_id:
                bkey = (str(value.get("key")), int(value.get("b", 0)))
                if bkey in self._own and self._own[bkey] != (
                    int(value.get("r", 0)),
                    int(value.get("t", 0)),
                ):
                    self._dirty.add(bkey)

    def _view_set(self, value: Any) -> None:
        if not isinstance(value, dict):
            return
        try:
            slot = (int(value["b"]), str(value["w"]))
            counts = (int(value.get("r", 0)), int(value.get("t", 0)))
        except (KeyError, TypeError, ValueError):
            return
        self._view.setdefault(str(value.get("key")), {})[slot] = counts

    def _on_session_change(self, keys: dict[str, Any]) -> None:
        for session_id, change in keys.items():
            old, new = change.get("oldValue"), change.get("newValue")
            if not (isinstance(old, dict) and isinstance(new, dict)):
                continue
            old_ts, new_ts = old.get("ts"), new.get("ts")
            if not (isinstance(old_ts, int | float) and isinstance(new_ts, int | float)):
                continue  # a foreign client's write: accept it as is
            if (old_ts, str(old.get("by", ""))) > (new_ts, str(new.get("by", ""))):
                self._repairs[session_id] = old
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
