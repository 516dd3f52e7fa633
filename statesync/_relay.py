"""Which connections a document change is relayed to: each update once per peer.

Rules / theory of operation
---------------------------
A change is pushed to every connection of the document except:

* the connection it came from, and any other connection to that same instance
  (two instances that list each other hold two links, one dialled by each);
* a second connection to an instance that already got it (one per instance);
* an instance that says (in its last ``{"links": [...]}`` frame) it is directly
  linked to the instance the change came from: that sender already
  pushed it there, or (when the sender is itself relaying) left it out for the
  same reason one hop further back, which ends at the instance that wrote it, and
  a writer pushes its own changes to every link.

So in a full mesh a change crosses the wire N-1 times, once per other instance,
instead of (N-1)^2; in a chain or a partial mesh it still reaches everyone. A
connection whose links are not known yet (an older instance, or a link whose
frame is still in flight) is sent to: a duplicate costs bytes, a gap costs
correctness. Yjs clients (no instance id) get every change.

What repairs a wrong view: an instance that loses a link announces its shrunk
link set and asks its remaining peers for everything it lacks (a SYNC_STEP1 on
each), so a change skipped because it "had" the lost link is fetched then.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar


class RelayTarget(Protocol):
    """What the rule reads from a connection."""

    @property
    def peer(self) -> str | None: ...

    @property
    def peer_links(self) -> frozenset[str] | None: ...


T = TypeVar("T", bound=RelayTarget)


def relay_targets(connections: Iterable[T], *, origin: object | None) -> list[T]:
    """The connections a change that arrived on ``origin`` (None: a local write) goes to.

    Args:
        connections: the document's open connections.
        origin: the connection the change came from, or None for a local write.

    Returns:
        The connections to push the change to, at most one per peer instance.
    """
    sender: str | None = getattr(origin, "peer", None) if origin is not None else None
    sent: set[str] = set()
    targets: list[T] = []
    for conn in connections:
        if conn is origin:
            continue
        peer = conn.peer
        if peer is not None:
            if peer == sender or peer in sent:
                continue
            links = conn.peer_links
            if sender is not None and links is not None and sender in links:
                continue
            sent.add(peer)
        targets.append(conn)
    return targets


__all__ = ["RelayTarget", "relay_targets"]
