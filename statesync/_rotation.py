"""Building the next epoch's document beside the live one, in slices, so no write waits.

Rules / theory of operation
---------------------------
A rotation used to rebuild every document at once on every instance, each into
items of its own: the first exchange in the new epoch then sent and applied the
whole document both ways, every entry existed three times, and the store repaired
the merge. Writes near a rotation waited for all of that. Now:

* **Built in slices, beside the old document.** An ``EpochBuilder`` copies the
  old document's entries into the new one a slice at a time (``step``), while the
  old document keeps serving reads, writes and peers. An entry that changes after
  its slice was copied is copied again when the builder finishes (``finish``), which
  is cheap: only those entries. A peer that rotated first makes us finish at once.
* **Settled entries are the same items everywhere.** What an entry held at the
  epoch's start minus ``SETTLE_S`` (its *settled value*: from its write time, or from
  the recent values the store remembers when it was written since) is the same on
  every instance by then. Settled values are grouped by a hash of their key into
  ``SHARED_BUCKETS`` buckets per map, and each bucket is written as the same Yjs
  items on every instance: one client whose id is a hash of (document, epoch, map,
  bucket, its entries), its entries in key order (``shared_bucket``). The new
  documents then agree item for item, the first exchange sends only what differs,
  nothing conflicts, and a write on top of a shared item integrates on every peer.
  (One client per entry would need no buckets, but every Yjs transaction costs time
  in the number of clients in the document.)
* **Recent values are carried by their writer.** A value written since (or without
  a time) is written on top of the shared items by the instance that wrote it
  (``by`` / ``w``), as its own write, and left out by the others while that writer is
  linked to them: so it exists once, on top of the same item everywhere. What is
  left to a writer is read from the old document until it arrives (``DocHub.value``)
  and carried by this instance if it never does (``DocHub`` overlap, store
  ``reconcile``); the builder lists those entries (``left``), so only they are
  looked at then. An entry this build already wrote as its own and another writer
  takes over before the build ends is copied again as it is now: our older item
  would otherwise stand beside that writer's and could win the tie between them.

Which applies to an entry is the caller's decision (``CarryRules``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, final

from pycrdt import Doc, Map
from pycrdt._pycrdt import Doc as _RustDoc

from ._doc import EpochDoc, collector_paused

SETTLE_S: Final = 1.0
"""Entries last written this long before an epoch starts are settled: every instance
has them by then (a one-way delay of up to a few hundred milliseconds plus a flush)."""
SLICE_S: Final = 0.0005
"""The shortest slice of a build before it yields to the event loop."""
ENTRY_S_GUESS: Final = 0.0001
"""CPU time to copy one entry, until a build has measured its own pace."""
SHARED_BUCKETS: Final = 128
"""Buckets of settled entries per map, one Yjs client each: few enough that a document's
client count stays small, many enough that a bucket two instances disagree on is small."""
_CLIENT_BITS: Final = 53
"""Yjs client ids stay below 2**53: JavaScript reads them as numbers."""


class Carry(enum.Enum):
    """What a rotation does with one entry of the old document."""

    SHARED = "shared"
    """Settled: written in its bucket's items, the same on every instance."""
    OWN = "own"
    """Written by this instance as its own write."""
    WRITER = "writer"
    """Recent and written by a linked peer: that peer carries it, on top of the same
    settled item."""
    DROP = "drop"
    """Expired or malformed: not carried."""


@final
@dataclass(frozen=True, slots=True)
class CarryRules:
    """The caller's decisions for one build (the store's schema knowledge)."""

    split: Callable[[str, str, Any], tuple[Any, Carry]]
    """``split(map_name, key, value)`` -> (the entry's settled value to share, or None;
    what to do with ``value`` on top of it: ``SHARED`` when it is that value itself)."""


def bucket_of_key(map_name: str, key: str) -> int:
    """Which shared bucket an entry of ``map_name`` belongs to."""
    digest = hashlib.blake2b(f"{map_name}\0{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % SHARED_BUCKETS


def shared_bucket(doc: str, epoch: int, map_name: str, bucket: int,
                  entries: dict[str, Any]) -> tuple[int, bytes]:
    """The client id and Yjs update of one bucket of settled entries: the same items on
    every instance that holds the same entries."""
    ordered = sorted(entries.items())
    canonical = json.dumps([doc, epoch, map_name, bucket, ordered], sort_keys=True,
                           separators=(",", ":"), default=str)
    digest = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
    client = (int.from_bytes(digest, "big") & ((1 << _CLIENT_BITS) - 1)) or 1
    try:
        return client, _items_update(client, map_name, ordered)
    except (AttributeError, TypeError):  # another pycrdt inside: the public way, slower
        scratch: Doc[Any] = Doc(client_id=client)
        target = scratch.get(map_name, type=Map)
        with scratch.transaction():
            for key, value in ordered:
                target[key] = value
        return client, scratch.get_update()


def _items_update(client: int, map_name: str, ordered: list[tuple[str, Any]]) -> bytes:
    """``shared_bucket``'s update through pycrdt's Rust classes: a Python ``Doc`` costs
    more to build than a small bucket's items."""
    raw = _RustDoc(client, False, None)
    txn = raw.create_transaction()
    try:
        target = raw.get_or_insert_map(txn, map_name)
        for key, value in ordered:
            target.insert(txn, key, value)
    finally:
        txn.commit()
        txn.drop()
    txn = raw.create_transaction()
    try:
        return bytes(raw.get_update(txn, b"\x00"))
    finally:
        txn.commit()
        txn.drop()


@final
class EpochBuilder:
    """Copies ``old`` into ``new`` (a fresh document of the next epoch) as ``rules`` say.

    Three passes, each in slices (``step``): plan every entry as it was when the build
    began (own ones are written at once, settled ones gathered in their bucket); write
    the buckets; then copy again what changed since. ``finish`` does what is left.
    """

    def __init__(self, old: EpochDoc, new: EpochDoc, rules: CarryRules) -> None:
        self.old = old
        self.new = new
        self._rules = rules
        self.counts: dict[Carry, int] = dict.fromkeys(Carry, 0)
        self._todo: deque[tuple[str, str]] = deque(
            (name, key) for name, ymap in old.maps.items() for key in list(ymap.keys())
        )
        self._seen: set[tuple[str, str]] = set(self._todo)
        self._done: set[tuple[str, str]] = set()
        self._buckets: dict[tuple[str, int], dict[str, Any]] = {}
        self._unwritten: deque[tuple[str, int]] = deque()
        self._changed: set[tuple[str, str]] = set()
        self._written: set[tuple[str, str]] = set()
        """Entries this build wrote as its own (``_on_top``)."""
        self.left: set[tuple[str, str]] = set()
        """Entries left to their writer (``Carry.WRITER``): the only ones the new document
        may lack when the overlap ends (``DocHub.install``)."""
        self._spent_s = 0.0
        self._copied = 0
        self.finished = False
        old.on_map_change(self._on_old_change)

    def __repr__(self) -> str:
        return (f"<EpochBuilder {self.new.name} epoch={self.new.epoch} todo={len(self._todo)} "
                f"buckets={len(self._unwritten)} changed={len(self._changed)}>")

    def step(self, budget_s: float = SLICE_S) -> bool:
        """Work for up to ``budget_s``; True once the new document is as the old one is now."""
        started = time.perf_counter()
        until = started + budget_s
        done = 0
        # One commit (and one set of events) per slice; no cyclic collection amid its copies.
        with collector_paused(), self.new.doc.transaction():
            while self._todo and time.perf_counter() < until:
                self._plan(*self._todo.popleft())
                done += 1
            if not self._todo and not self._unwritten and self._buckets:
                self._unwritten.extend(sorted(self._buckets))
            while not self._todo and self._unwritten and time.perf_counter() < until:
                done += self._write_bucket(*self._unwritten.popleft())
            while (not self._todo and not self._unwritten and not self._buckets
                   and self._changed and time.perf_counter() < until):
                self._on_top(*self._changed.pop())
                done += 1
        self._spent_s += time.perf_counter() - started
        self._copied += done
        return self.step_done

    def work_left_s(self) -> float:
        """An estimate of the CPU time the rest of the build takes (from the pace so far)."""
        per_entry = self._spent_s / self._copied if self._copied else ENTRY_S_GUESS
        bucketed = sum(len(e) for e in self._buckets.values())
        return (len(self._todo) + bucketed + len(self._changed)) * per_entry

    @property
    def step_done(self) -> bool:
        """True while every entry is copied as it is now (``finish`` has nothing to do)."""
        return not self._todo and not self._buckets and not self._changed

    def finish(self) -> EpochDoc:
        """Do what is left of the build; return the new document."""
        if self.finished:
            return self.new
        while not self.step(budget_s=3600.0):
            pass
        self.old.off_map_change(self._on_old_change)
        self.finished = True
        return self.new

    def cancel(self) -> None:
        """Stop following the old document; the new one is dropped unfinished."""
        self.old.off_map_change(self._on_old_change)
        self._todo.clear()
        self._buckets.clear()
        self._changed.clear()
        self.finished = True

    def _on_old_change(self, map_name: str, keys: dict[str, Any], remote: bool) -> None:
        for key in keys:
            entry = (map_name, key)
            if entry not in self._seen:  # written since the build began
                self._seen.add(entry)
                self._todo.append(entry)
            elif entry in self._done:
                self._changed.add(entry)  # planned already: copied again on top

    def _plan(self, map_name: str, key: str) -> None:
        self._done.add((map_name, key))
        value = self.old.maps[map_name].get(key)
        if value is None:
            return
        shared, how = self._rules.split(map_name, key, value)
        if shared is not None:
            self.counts[Carry.SHARED] += 1
            bucket = (map_name, bucket_of_key(map_name, key))
            self._buckets.setdefault(bucket, {})[key] = shared
        if how is not Carry.SHARED:
            self.counts[how] += 1
            if how is Carry.WRITER:
                self.left.add((map_name, key))
            if how is Carry.OWN:
                self._changed.add((map_name, key))  # written after the buckets, on top

    def _write_bucket(self, map_name: str, bucket: int) -> int:
        entries = self._buckets.pop((map_name, bucket), {})
        if not entries:
            return 0
        _, update = shared_bucket(self.new.name, self.new.epoch, map_name, bucket, entries)
        self.new.doc.apply_update(update)
        return len(entries)

    def _on_top(self, map_name: str, key: str) -> None:
        """Make the new document hold the entry as it is now, if this instance carries it."""
        value = self.old.maps[map_name].get(key)
        target = self.new.maps[map_name]
        if value is None:
            if key in target:
                del target[key]
            return
        entry = (map_name, key)
        how = self._rules.split(map_name, key, value)[1]
        if how is Carry.WRITER:
            self.left.add(entry)
        # Once written here, an entry follows the old document even after another writer
        # took it over: our own item would otherwise stand beside that writer's, and its
        # older value could win the tie between the two.
        if (entry in self._written or how is Carry.OWN) and target.get(key) != value:
            target[key] = value
            self._written.add(entry)


__all__ = ["ENTRY_S_GUESS", "SETTLE_S", "SHARED_BUCKETS", "SLICE_S", "Carry", "CarryRules",
           "EpochBuilder", "bucket_of_key", "shared_bucket"]
