"""Control frames between instances, and the liveness rule for one sync link (no I/O).

Rules / theory of operation
---------------------------
* Instance-to-instance connections carry y-protocols messages as BINARY frames and
  control messages as TEXT frames holding one JSON object. Yjs clients never get a
  control frame, and an instance that does not know a key ignores it, so old and
  new versions can share a mesh.

  ==========================  ====================================================
  frame                       meaning
  ==========================  ====================================================
  ``{"instance": W,           hello, sent first by the accepting side: the writer
  "ping": true}``             id of the process, and that it answers pings
  ``{"ping": n}``             are you there? answered at once with ``{"pong": n}``
  ``{"pong": n}``             the answer to ping ``n`` (gives the round trip)
  ``{"links": [W, ...]}``     the instances this one exchanges this document with
                              directly; sent whenever that set changes
  ``{"epoch": N}``            this side rotated the document into epoch N; what
                              follows on this connection belongs to it (see
                              ``DocHub.install``)
  ``{"ahead": N,              this side's own part of epoch N's document (base64
  "part": B}``                Yjs update), sent while both sides still build it,
                              before the install (see ``DocHub.send_ahead``)
  ==========================  ====================================================

  ``"ping": true`` in the hello (or ``?ping=1`` from the dialler) says the side
  speaks all of these; only then are pings enforced and rotations done in-band.

* Liveness: both sides ping every ``interval_s``. Any frame received is proof of
  life (a pong can queue behind a large update). A link that heard nothing for
  ``misses`` intervals is dead: the shell closes it and the supervisor redials. So
  a black-holed peer (no FIN, no RST, TCP happily buffering) is seen within
  ``interval_s * misses`` plus one interval, not the minutes TCP would take.
* The rule is armed only once the peer showed it answers pings (the hello says so,
  the dialler asks with ``?ping=1``, or a ping or pong arrives): an older instance
  that never pongs is not declared dead for being quiet.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, final

DEFAULT_PING_INTERVAL_S: Final = 1.0
"""One tiny frame per second per link: cheap, and a cut is seen within seconds."""
DEFAULT_PING_MISSES: Final = 3
"""Three silent intervals: one late pong on a busy link is not a partition."""


@final
@dataclass(frozen=True, slots=True)
class Control:
    """One decoded control frame; the fields it did not carry are None."""

    instance: str | None = None
    speaks_ping: bool = False
    ping: int | None = None
    pong: int | None = None
    links: frozenset[str] | None = None
    epoch: int | None = None
    ahead: tuple[int, bytes] | None = None
    """(epoch, update) of an ``{"ahead": N, "part": B}`` frame."""


def hello_frame(writer_id: str) -> str:
    """The TEXT frame an accepting instance sends first on a peer connection."""
    return json.dumps({"instance": writer_id, "ping": True})


def ping_frame(seq: int) -> str:
    """A ping; the peer answers ``pong_frame(seq)``."""
    return json.dumps({"ping": seq})


def pong_frame(seq: int) -> str:
    """The answer to ``ping_frame(seq)``."""
    return json.dumps({"pong": seq})


def links_frame(peers: Iterable[str]) -> str:
    """This instance's direct links for one document, as writer ids."""
    return json.dumps({"links": sorted(peers)})


def epoch_frame(epoch: int) -> str:
    """This side now holds the document of ``epoch``."""
    return json.dumps({"epoch": epoch})


def ahead_frame(epoch: int, update: bytes) -> str:
    """This instance's own part of ``epoch``'s document, sent before the install."""
    return json.dumps({"ahead": epoch, "part": base64.b64encode(update).decode("ascii")})


def read_control(data: str) -> Control | None:
    """Decode a TEXT frame; None when it is not a JSON object. Unknown keys are ignored."""
    try:
        raw: Any = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    links = raw.get("links")
    instance = raw.get("instance")
    ping, pong, epoch = raw.get("ping"), raw.get("pong"), raw.get("epoch")
    ahead, part = raw.get("ahead"), raw.get("part")
    update = None
    if type(ahead) is int and isinstance(part, str):
        try:
            update = base64.b64decode(part, validate=True)
        except (ValueError, binascii.Error):
            update = None  # not a part: ignored like an unknown key
    return Control(
        instance=instance if isinstance(instance, str) else None,
        speaks_ping=ping is True,
        ping=ping if type(ping) is int else None,
        pong=pong if type(pong) is int else None,
        epoch=epoch if type(epoch) is int else None,
        ahead=(ahead, update) if type(ahead) is int and update is not None else None,
        links=(
            frozenset(p for p in links if isinstance(p, str)) if isinstance(links, list) else None
        ),
    )


@final
class Liveness:
    """Whether one link's peer is still there, from pings sent and frames heard.

    Time is an argument (``now``, seconds on any monotonic clock); nothing here sleeps.
    """

    __slots__ = ("_armed", "_last_heard", "_misses", "_sent", "_seq", "interval_s")

    def __init__(self, *, interval_s: float, misses: int, now: float, armed: bool = False) -> None:
        if not interval_s > 0 or misses < 1:
            raise ValueError("Liveness: interval_s must be > 0 and misses >= 1")
        self.interval_s = interval_s
        self._misses = misses
        self._last_heard = now
        self._armed = armed
        self._seq = 0
        self._sent: dict[int, float] = {}

    def __repr__(self) -> str:
        state = "armed" if self._armed else "unarmed"
        return f"<Liveness {state} last_heard={self._last_heard} seq={self._seq}>"

    @property
    def dead_after_s(self) -> float:
        """How long a peer may stay silent before its link is dead."""
        return self.interval_s * self._misses

    @property
    def is_armed(self) -> bool:
        """True once the peer has shown it answers pings."""
        return self._armed

    def arm(self) -> None:
        """The peer answers pings: from now on silence counts against it."""
        self._armed = True

    def on_frame(self, *, now: float) -> None:
        """Record that any frame arrived from the peer."""
        self._last_heard = max(self._last_heard, now)

    def next_ping(self, *, now: float) -> int:
        """Return the sequence number of a ping being sent at ``now``."""
        self._seq += 1
        self._sent[self._seq] = now
        # Only the last few can still be answered in time; forget the rest.
        for old in [s for s in self._sent if s <= self._seq - self._misses - 1]:
            del self._sent[old]
        return self._seq

    def on_pong(self, seq: int, *, now: float) -> float | None:
        """Record a pong; return the round trip in seconds, or None for an unknown ``seq``."""
        self._armed = True
        self.on_frame(now=now)
        sent = self._sent.pop(seq, None)
        return None if sent is None else max(0.0, now - sent)

    def seconds_left(self, *, now: float) -> float:
        """Time until the link is dead if nothing arrives (``interval_s`` while unarmed)."""
        if not self._armed:
            return self.interval_s
        return max(0.0, self._last_heard + self.dead_after_s - now)

    def is_dead(self, *, now: float) -> bool:
        """True once an armed link has heard nothing for ``interval_s * misses``."""
        return self._armed and now - self._last_heard >= self.dead_after_s


__all__ = [
    "DEFAULT_PING_INTERVAL_S",
    "DEFAULT_PING_MISSES",
    "Control",
    "Liveness",
    "ahead_frame",
    "epoch_frame",
    "hello_frame",
    "links_frame",
    "ping_frame",
    "pong_frame",
    "read_control",
]
