"""Response cache decisions: what may be cached, under which key, and what a client asked.

Rules / theory of operation
---------------------------
* ``cache: approximate`` also gives a single-turn request's near-identical form (a
  multi-turn one's too with ``cache_multi_turn``; ``routing._approximate``), used by the
  proxy only under degradation.
* Only ``POST /chat/completions`` on a route whose ``cache`` is not ``off`` is
  cacheable. With ``exact`` (and ``approximate``) the request must be deterministic:
  ``temperature`` 0 or an integer ``seed``; ``always`` caches sampled requests too
  (the first answer is then replayed to everyone). A request asking for
  ``logprobs`` is never cached: a streamed answer's log probabilities are not kept.
* The key is a SHA-256 over a canonical JSON form (sorted keys, no spaces) of the
  route alias, the scope and every body field that changes the answer. Fields that
  do not (``user``, ``stream``, ``stream_options``, ``metadata``, ``model``, whose
  alias is the route) are left out, so a stream and a non-stream request share one
  entry. With ``cache_scope: key`` the client key's name is part of the key: an
  entry stored for one key can never be found by another.
* ``Cache-Control`` from the client: ``no-store`` neither reads nor writes,
  ``no-cache`` does not read but writes the fresh answer.
* An entry is *fresh* for ``ttl`` after it was stored and *stale* for
  ``stale_if_error`` after that: a stale entry is served only when every upstream
  failed, marked ``stale``.
* What is stored is decided by ``is_storable``: a whole 200 answer, produced for the
  request as the client sent it (not a fallback model's, not under a capped
  ``max_tokens``), with no choice cut short by a refusal filter.

Nothing here reads a clock: times are arguments.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._approximate import ApproximateQuery, approximate_query
from ._policies import CacheMode, CachePolicy, CacheScope

__all__ = [
    "CACHE_PATHS",
    "CacheDirectives",
    "CacheLookup",
    "Freshness",
    "NotCacheable",
    "cache_directives",
    "cache_lookup",
    "freshness",
    "is_storable",
]

#: Endpoints whose answers are cached (streams and JSON share entries).
CACHE_PATHS: Final = frozenset({"/chat/completions"})
#: Body fields that do not change the answer: left out of the key.
_IGNORED_FIELDS: Final = frozenset({"model", "user", "stream", "stream_options", "metadata"})
#: The format of the key's canonical form; bump it when the form changes.
_KEY_VERSION: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheDirectives:
    """What the client's ``Cache-Control`` allows."""

    read: bool = True
    write: bool = True


def cache_directives(header: str | None) -> CacheDirectives:
    """The request's ``Cache-Control`` as read/write permissions (RFC 9111 names)."""
    if not header:
        return CacheDirectives()
    names = {part.split("=", 1)[0].strip().lower() for part in header.split(",")}
    if "no-store" in names:
        return CacheDirectives(read=False, write=False)
    return CacheDirectives(read="no-cache" not in names, write=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheLookup:
    """A cacheable request: its key, and whether the client allows reading and writing."""

    key: str
    route: str
    read: bool
    write: bool
    #: For ``cache: approximate`` (single-turn, unless the route allows multi-turn): its
    #: near-identical form.
    approximate: ApproximateQuery | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NotCacheable:
    """Why a request is not cached (``bypass`` in metrics and headers when the client said)."""

    reason: str
    by_client: bool = False


def _is_deterministic(payload: Mapping[str, Any]) -> bool:
    temperature = payload.get("temperature")
    seed = payload.get("seed")
    return (type(temperature) in (int, float) and temperature == 0) or type(seed) is int


def cache_lookup(*, route: str, mode: CacheMode, scope: CacheScope, method: str, path: str,
                 payload: Mapping[str, Any] | None, client: str | None,
                 cache_control: str | None, multi_turn: bool = False
                 ) -> CacheLookup | NotCacheable:
    """Whether a request is served through the cache, and its key.

    Args:
        route: the route's model alias (part of the key).
        multi_turn: the route's ``cache_multi_turn``: multi-turn chats take part in
            approximate matching too.
        path: below ``/v1``, query included (a query makes it uncacheable).
        client: the client key's name; None when auth is off.
        cache_control: the request's ``Cache-Control`` header.
    """
    if mode is CacheMode.OFF:
        return NotCacheable(reason="off")
    if method != "POST" or path not in CACHE_PATHS or payload is None:
        return NotCacheable(reason="endpoint")
    if mode is not CacheMode.ALWAYS and not _is_deterministic(payload):
        return NotCacheable(reason="sampled")
    if payload.get("logprobs"):
        return NotCacheable(reason="logprobs")
    directives = cache_directives(cache_control)
    if not directives.read and not directives.write:
        return NotCacheable(reason="no-store", by_client=True)
    owner = (client or "-") if scope is CacheScope.KEY else "*"
    body = {k: v for k, v in payload.items() if k not in _IGNORED_FIELDS}
    canonical = json.dumps([_KEY_VERSION, route, path, owner, body], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    near = approximate_query(route=route, owner=owner, body=body, multi_turn=multi_turn) \
        if mode is CacheMode.APPROXIMATE else None
    return CacheLookup(key=digest, route=route, read=directives.read, write=directives.write,
                       approximate=near)


class Freshness(enum.Enum):
    """How an entry may be used now."""

    FRESH = "fresh"  # serve it
    STALE = "stale"  # only if every upstream failed (stale-if-error)
    GONE = "gone"  # never


def freshness(*, stored_at: float, policy: CachePolicy, now: float) -> Freshness:
    """Whether an entry stored at ``stored_at`` is fresh, stale or gone at ``now``."""
    age = now - stored_at
    if age < policy.ttl_s:
        return Freshness.FRESH
    if age < policy.ttl_s + policy.stale_if_error_s:
        return Freshness.STALE
    return Freshness.GONE


def is_storable(*, status: int, answer: Mapping[str, Any] | None, as_asked: bool) -> bool:
    """Whether an answer may be stored for the request's key.

    Args:
        answer: the whole chat completion (a streamed one assembled); None if it
            was cut, errored or could not be read.
        as_asked: the answer was produced for the request as the client sent it
            (no fallback model, no ``max_tokens`` capped by a degradation tier).
    """
    if status != 200 or answer is None or not as_asked:
        return False
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") in
               ("stop", "length", "tool_calls", "function_call") for c in choices)
