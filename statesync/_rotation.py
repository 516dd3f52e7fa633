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
* **Settled entries are the same item everywhere.** An entry last written before
  ``settled_before`` (the epoch's start minus ``SETTLE_S``) holds the same value on
  every instance by then, so each instance writes it as the same Yjs item: its
  client id is a hash of (document, epoch, map, key, value) (``shared_item``). The
  new documents then agree item for item, the first exchange sends only what
  differs, and nothing conflicts. Two instances that disagree on an entry write two
  different items for it (a later write wins by the store's repair, as before).
* **Recent entries are carried by their writer.** An entry written after that
  (or without a time) is written by the instance that wrote it last (``by`` / ``w``)
  as its own write, and left out by the others while that writer is linked to
  them: so a recent entry exists once, not once per instance, and a write right
  after the rotation is not ordered before another instance's copy of it. What is
  left to a writer is read from the old document until it arrives (``DocHub.value``)
  and carried by this instance if it never does (``DocHub`` overlap, store
  ``reconcile``).

Which of the three applies to an entry is the caller's decision (a ``CarryPlan``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, final

from pycrdt import Doc, Map
from pycrdt._pycrdt import Doc as _RustDoc

from ._doc import EpochDoc

SETTLE_S: Final = 1.0
"""Entries last written this long before an epoch starts are settled: every instance
has them by then (a one-way delay of up to a few hundred milliseconds plus a flush)."""
SLICE_S: Final = 0.0005
"""The shortest slice of a build before it yields to the event loop."""
ENTRY_S_GUESS: Final = 0.0001
"""CPU time to copy one entry, until a build has measured its own pace."""
_CLIENT_BITS: Final = 53
"""Yjs client ids stay below 2**53: JavaScript reads them as numbers."""


class Carry(enum.Enum):
    """What a rotation does with one entry of the old document."""

    SHARED = "shared"
    """Settled: written as the item every instance writes for it (``shared_item``)."""
    OWN = "own"
    """Written by this instance as its own write."""
    WRITER = "writer"
    """Written by a linked peer since the build began: that peer carries it, on top of
    the same settled item (so a copy here that is now stale is left as it is)."""
    WRITER_BEFORE = "writer_before"
    """Recent, written by a linked peer before the build began: that peer carries it,
    and a stale copy here is overwritten (the peer's copy may not sit on top of it)."""
    DROP = "drop"
    """Expired or malformed: not carried."""


CarryPlan = Callable[[str, str, Any], Carry]
"""``plan(map_name, key, value)``: what to do with an entry of the old document."""


def shared_client_id(doc: str, epoch: int, map_name: str, key: str, value: Any) -> int:
    """The Yjs client id of the shared item for one settled entry."""
    canonical = json.dumps([doc, epoch, map_name, key, value], sort_keys=True,
                           separators=(",", ":"), default=str)
    digest = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") & ((1 << _CLIENT_BITS) - 1)) or 1


def shared_item(doc: str, epoch: int, map_name: str, key: str, value: Any) -> tuple[int, bytes]:
    """The client id and Yjs update of the one item ``map_name[key] = value`` that every
    instance writes for a settled entry."""
    client = shared_client_id(doc, epoch, map_name, key, value)
    try:
        return client, _one_item_update(client, map_name, key, value)
    except (AttributeError, TypeError):  # another pycrdt inside: the public way, 2x slower
        scratch: Doc[Any] = Doc(client_id=client)
        scratch.get(map_name, type=Map)[key] = value
        return client, scratch.get_update()


def _one_item_update(client: int, map_name: str, key: str, value: Any) -> bytes:
    """``shared_item``'s update through pycrdt's Rust classes: the Python ``Doc`` costs
    more to build than the item itself, once per settled entry of every rotation."""
    raw = _RustDoc(client, False, None)
    txn = raw.create_transaction()
    try:
        raw.get_or_insert_map(txn, map_name).insert(txn, key, value)
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
    """Copies ``old`` into ``new`` (a fresh document of the next epoch) as ``plan`` says."""

    def __init__(self, old: EpochDoc, new: EpochDoc, plan: CarryPlan) -> None:
        self.old = old
        self.new = new
        self._plan = plan
        self.counts: dict[Carry, int] = dict.fromkeys(Carry, 0)
        self._todo: deque[tuple[str, str]] = deque(
            (name, key) for name, ymap in old.maps.items() for key in list(ymap.keys())
        )
        self._seen: set[tuple[str, str]] = set(self._todo)
        self._done: set[tuple[str, str]] = set()
        self._changed: set[tuple[str, str]] = set()
        self._shared: dict[tuple[str, str], int] = {}
        self._spent_s = 0.0
        self._copied = 0
        self.finished = False
        old.on_map_change(self._on_old_change)

    def __repr__(self) -> str:
        return (f"<EpochBuilder {self.new.name} epoch={self.new.epoch} todo={len(self._todo)} "
                f"changed={len(self._changed)}>")

    def step(self, budget_s: float = SLICE_S) -> bool:
        """Copy entries (and recopy changed ones) for up to ``budget_s``; True once all
        were copied and nothing changed since."""
        started = time.perf_counter()
        until = started + budget_s
        copied = 0
        with self.new.doc.transaction():  # one commit (and one set of events) per slice
            while self._todo and time.perf_counter() < until:
                self._copy(*self._todo.popleft())
                copied += 1
            while not self._todo and self._changed and time.perf_counter() < until:
                self._recopy(*self._changed.pop())
                copied += 1
        self._spent_s += time.perf_counter() - started
        self._copied += copied
        return self.step_done

    def work_left_s(self) -> float:
        """An estimate of the CPU time the rest of the build takes (from the pace so far)."""
        per_entry = self._spent_s / self._copied if self._copied else ENTRY_S_GUESS
        return (len(self._todo) + len(self._changed)) * per_entry

    @property
    def step_done(self) -> bool:
        """True while every entry is copied as it is now (``finish`` has nothing to do)."""
        return not self._todo and not self._changed

    def finish(self) -> EpochDoc:
        """Copy what is left and what changed since it was copied; return the new document."""
        if self.finished:
            return self.new
        with self.new.doc.transaction():
            while self._todo:
                self._copy(*self._todo.popleft())
            changed, self._changed = self._changed, set()
            for map_name, key in sorted(changed):
                self._recopy(map_name, key)
        self.old.off_map_change(self._on_old_change)
        self.finished = True
        return self.new

    def cancel(self) -> None:
        """Stop following the old document; the new one is dropped unfinished."""
        self.old.off_map_change(self._on_old_change)
        self._todo.clear()
        self.finished = True

    def _on_old_change(self, map_name: str, keys: dict[str, Any], remote: bool) -> None:
        for key, change in keys.items():
            entry = (map_name, key)
            if entry not in self._seen:  # written since the build started
                self._seen.add(entry)
                self._todo.append(entry)
                continue
            if entry not in self._done:
                # Copy it as it was when the build started, then again as it is now: so
                # whether a settled entry is shared does not hang on when each instance
                # got to it, only on what it held at the (clock-agreed) start.
                self._done.add(entry)
                self._copy_value(map_name, key, change.get("oldValue"))
            self._changed.add(entry)

    def _copy(self, map_name: str, key: str) -> None:
        if (map_name, key) in self._done:
            return  # copied early, when it changed
        self._done.add((map_name, key))
        self._copy_value(map_name, key, self.old.maps[map_name].get(key))

    def _copy_value(self, map_name: str, key: str, value: Any) -> None:
        if value is None:
            return
        how = self._plan(map_name, key, value)
        self.counts[how] += 1
        if how is Carry.SHARED:
            self._share(map_name, key, value)
        elif how is Carry.OWN:
            self.new.maps[map_name][key] = value

    def _share(self, map_name: str, key: str, value: Any) -> None:
        client, update = shared_item(self.new.name, self.new.epoch, map_name, key, value)
        self._shared[map_name, key] = client
        self.new.shared_items[map_name, key] = update
        self.new.doc.apply_update(update)

    def _recopy(self, map_name: str, key: str) -> None:
        """An entry changed after it was copied: make the new document hold its value now."""
        value = self.old.maps[map_name].get(key)
        target = self.new.maps[map_name]
        present = key in target
        if value is None:
            if present:
                del target[key]
            return
        how = self._plan(map_name, key, value)
        if present:
            if target[key] != value and how not in (Carry.DROP, Carry.WRITER):
                target[key] = value  # on top of the stale copy, so it wins here at once
                under = self._shared.get((map_name, key))
                if under is not None:
                    self.new.under_own.add(under)  # sent with our own part (``own_update``)
        elif how is Carry.SHARED:
            self._share(map_name, key, value)
        elif how is Carry.OWN:
            self.new.maps[map_name][key] = value


__all__ = ["ENTRY_S_GUESS", "SETTLE_S", "SLICE_S", "Carry", "CarryPlan", "EpochBuilder",
           "shared_client_id", "shared_item"]
