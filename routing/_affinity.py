"""Session affinity: what an answered request does to its session's pin.

Rules / Theory of operation
---------------------------
A session (``X-Session-ID``, or the OpenAI ``user`` field) is pinned to the
upstream that answered it last, so its next request goes where its prompt cache
is; ``Router.plan`` honours the pin while that upstream is healthy. After each
request of a session:

===============================================  ==============================
the request ended with                            the session
===============================================  ==============================
an error or a refusal (status 400 and above)      stays as it was
an answer from a fallback model's upstream        stays as it was: the fallback
                                                  serves another model, and the
                                                  session goes back to its own
                                                  upstreams once they are back
an answer from the upstream it is pinned to       is touched (its TTL restarts)
an answer from another upstream (or no pin yet)   is pinned to that upstream,
                                                  as a move from the pin the
                                                  request saw (if any)
===============================================  ==============================

A ``Pin`` says which pin the request saw (``moved_from``): statesync orders pins by
it, so a pin made without seeing one never replaces an earlier pin made at another
instance, while an explicit move away from a pin does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Pin:
    """Pin the session to ``upstream`` (creating it), for every instance."""

    upstream: str
    #: The upstream the session was pinned to when the request came (None: no pin):
    #: the pin this one moves the session away from.
    moved_from: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Touch:
    """The session stays where it is; record that it was active."""


def affinity_after(*, pinned: str | None, served_by: str, status: int,
                   fallback: bool) -> Pin | Touch | None:
    """What to do with a session once its request is answered (see the table above).

    Args:
        pinned: the upstream the session was pinned to when the request came.
        served_by: the upstream whose answer the client got.
        status: the HTTP status the client got.
        fallback: the answer came from the route's fallback model.

    Returns:
        ``Pin``, ``Touch``, or None to leave the session alone.
    """
    if status >= 400 or fallback:
        return None
    return Touch() if served_by == pinned else Pin(upstream=served_by, moved_from=pinned)
