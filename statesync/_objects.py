"""``ObjectDirectory``: which upstream holds each stateful object, for every instance.

Rules / theory of operation
---------------------------
* Files, batches, stored responses, vector stores, assistants, threads and
  fine-tuning jobs live at the provider that created them; a later call that names
  one must go back there, whichever instance receives it. ``proxy._objects`` finds
  the ids; this module remembers and shares where they live.
* Schema: ``sessions`` document, map ``objects``: ``id -> {upstream, until, ts, by}``
  (plain JSON, readable by a stock Yjs client). ``until`` is the write time plus the
  TTL in force then (the object's lifetime at the provider); an expired entry is
  never returned and is left out of the next rotation's rebuilt document.
* Written once, when the object is created (ids are unique: no merge question); a
  later write for the same id simply replaces it.
* Bounded: past ``max_entries`` the oldest entries are deleted, down to
  ``EVICT_TO`` of the cap in one transaction, so eviction runs once per tenth of
  the cap's writes rather than on every write.
* A value written by a foreign client that is not ``{upstream: str, until: number}``
  is ignored, never raised on.
"""

from __future__ import annotations

from typing import Any, Final, final

from ._doc import DocHub, EpochDoc
from ._metrics import SyncMetrics

EVICT_TO: Final = 0.9
"""Share of ``max_entries`` left after an eviction."""


def object_entry_is_live(value: Any, now: float) -> bool:
    """Whether a map value is a well-formed entry that has not expired."""
    if not isinstance(value, dict) or not isinstance(value.get("upstream"), str):
        return False
    until = value.get("until")
    return isinstance(until, int | float) and until > now


@final
class ObjectDirectory:
    """Object id -> the upstream that holds it, shared through the ``sessions`` document."""

    def __init__(self, hub: DocHub, *, writer_id: str, metrics: SyncMetrics) -> None:
        self._hub = hub
        self._writer_id = writer_id
        self._metrics = metrics
        self._count = 0
        hub.on_new_doc(self._attach)
        self._attach(hub.doc)

    def __repr__(self) -> str:
        return f"<ObjectDirectory entries={len(self)}>"

    def __len__(self) -> int:
        return self._count

    def _attach(self, doc: EpochDoc) -> None:
        # pycrdt's len of a map walks every key (milliseconds at 100,000 entries, and it
        # was asked on every write): count once per document, then follow its changes.
        self._count = len(doc.maps["objects"])
        doc.on_map_change(self._on_change)

    def _on_change(self, map_name: str, keys: dict[str, Any], remote: bool) -> None:
        if map_name == "objects":
            for change in keys.values():
                action = change.get("action")
                self._count += 1 if action == "add" else -1 if action == "delete" else 0

    def remember(self, object_id: str, upstream: str, *, now: float, ttl_s: float,
                 max_entries: int) -> None:
        """Record that ``upstream`` holds ``object_id`` for ``ttl_s``; visible to peers at once."""
        objects = self._hub.doc.maps["objects"]
        with self._hub.doc.doc.transaction():
            entries = self._count + (object_id not in objects)  # counted at commit
            objects[object_id] = {"upstream": upstream, "until": now + ttl_s, "ts": now,
                                  "by": self._writer_id}
            if entries > max_entries:
                self._evict(now, keep=int(max_entries * EVICT_TO))
        self._metrics.objects.set(len(self))

    def upstream_of(self, object_id: str, *, now: float) -> str | None:
        """The upstream holding ``object_id``; None if unknown or expired."""
        value = self._hub.value("objects", object_id)
        return str(value["upstream"]) if value is not None and object_entry_is_live(value, now) \
            else None

    def _evict(self, now: float, *, keep: int) -> None:
        objects = self._hub.doc.maps["objects"]
        by_age = sorted(objects.items(), key=lambda kv: _written_at(kv[1], now))
        for key, _ in by_age[:max(0, len(by_age) - keep)]:
            del objects[key]


def _written_at(value: Any, now: float) -> float:
    """Eviction order: expired and malformed entries first, then oldest writes."""
    if not object_entry_is_live(value, now):
        return float("-inf")
    ts = value.get("ts")
    return float(ts) if isinstance(ts, int | float) else float("-inf")
