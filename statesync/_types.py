"""Plain values and errors shared by every statesync module.

Nothing here touches pycrdt or aiohttp: these are the types that cross the package
boundary (``SyncSettings``, ``Session``, ``Usage``, ``UsageBucket``, ``UpstreamReport``,
``LinkState``)
and the exception tree rooted at ``StateSyncError``. Numbers read back from a Yjs
document are floats whatever the writer meant, so every value type here converts
explicitly (``int(...)``/``float(...)``) in its ``from_wire`` constructor.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, final

Clock = Callable[[], float]
"""Wall-clock epoch seconds, ``time.time`` in production and a fake in tests."""

DOC_NAMES: Final = ("sessions", "usage")
"""Documents served at ``/sync/{doc}``: sessions + health gossip, and rate counters.

Counters churn far more than sessions, so they live in their own document and a
Yjs client reading sessions never downloads them.
"""


class StateSyncError(Exception):
    """Root of every error raised by ``statesync``."""


class SyncConfigError(StateSyncError):
    """A ``SyncSettings`` value is invalid; the message names the field."""


class SyncProtocolError(StateSyncError):
    """A peer sent bytes that are not a valid y-protocols message or Yjs update.

    The connection that received them moves to ``CLOSED`` and is dropped; the
    document is left as it was before the message.
    """


class PeerLinkError(StateSyncError):
    """A peer link failed (connect, handshake or transport)."""


class SnapshotError(StateSyncError):
    """The on-disk snapshot could not be read or written."""


class LinkState(enum.Enum):
    """State of one outbound peer link, as shown by ``/health``."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    UNAUTHORIZED = "unauthorized"  # the peer refused our token; retried slowly
    SELF = "self"  # the address is this very process (DNS discovery); never retried
    CLOSED = "closed"  # terminal: aclose() was called


DEFAULT_MAX_VALUE_BYTES: Final = 16 * 1024
"""One map value, JSON-encoded (a session with its attributes is a few hundred bytes)."""
DEFAULT_MAX_DOCUMENT_BYTES: Final = 64 * 1024 * 1024
"""One document, encoded; 100,000 sessions take about 20 MiB."""
DEFAULT_MAX_SESSIONS: Final = 100_000
"""Sessions kept; past it the least recently seen go first (client-chosen ids are free)."""

_DNS_PREFIX: Final = "dns:"
DEFAULT_SYNC_PORT: Final = 8080


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class SyncSettings:
    """How this instance takes part in state sync; validated when built.

    ``peers`` are base URLs (``ws://10.0.0.2:8080/sync``); a link appends ``/{doc}``.
    ``discovery`` is ``dns:name[:port]``: the name's A/AAAA records are resolved
    every ``discovery_interval_s`` and each address becomes a peer (our own one is
    recognised by the handshake and parked as SELF).
    ``token`` None means inbound sync is refused; outbound links then send no token.
    """

    instance_id: str
    token: str | None
    peers: tuple[str, ...] = ()
    discovery: str | None = None
    discovery_interval_s: float = 10.0
    session_ttl_s: float = 86400.0
    rotate_every_s: float = 3600.0
    flush_interval_s: float = 0.05
    snapshot_path: str | None = None
    ping_interval_s: float = 1.0
    """Each side of a peer link pings this often (``_control``)."""
    ping_misses: int = 3
    """A link silent for this many ping intervals is dead: closed and redialled."""
    #: How long usage counts: ``usage`` sums this much past, and older counts are
    #: dropped. The owner of the limits (``routing``'s per-minute rpm/tpm) sets it.
    usage_window_s: float = 60.0
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    max_sessions: int = DEFAULT_MAX_SESSIONS
    relay_url: str | None = None
    """A Redis server (``redis://``, ``rediss://``, ``unix://``) that relays the documents
    between instances instead of peer links (``_redis_relay``); None: the mesh."""
    relay_prefix: str = "skyroute:sync:"
    """Key prefix of the relay's streams and snapshots (one per fleet on a shared Redis)."""
    relay_compact_every_s: float = 30.0
    """How often the relay's streams are compacted into a snapshot and trimmed."""

    def __post_init__(self) -> None:
        if not self.instance_id or "|" in self.instance_id:
            raise SyncConfigError("sync.instance_id: must be non-empty and contain no '|'")
        if self.token is not None and not self.token:
            raise SyncConfigError("sync.token: must be non-empty (or unset to refuse sync)")
        object.__setattr__(self, "peers", tuple(p.rstrip("/") for p in self.peers))
        for peer in self.peers:
            if not peer.startswith(("ws://", "wss://")):
                raise SyncConfigError(f"sync.peers: {peer!r} must start with ws:// or wss://")
        if self.discovery is not None:
            self.discovery_target()  # validates
        for name in ("session_ttl_s", "rotate_every_s", "flush_interval_s",
                     "discovery_interval_s", "usage_window_s", "ping_interval_s",
                     "max_value_bytes", "max_document_bytes", "max_sessions"):
            if not getattr(self, name) > 0:
                raise SyncConfigError(f"sync.{name}: must be > 0")
        if self.relay_url is not None:
            if not self.relay_url.startswith(("redis://", "rediss://", "unix://")):
                raise SyncConfigError(f"sync.relay.url: {_redacted(self.relay_url)!r} must "
                                      "start with redis://, rediss:// or unix://")
            if self.token is None:
                raise SyncConfigError("sync.relay: needs sync.token (it signs every update)")
            if self.peers or self.discovery is not None:
                raise SyncConfigError("sync.relay: replaces peers and discovery (the engine "
                                      "carries every update); remove sync.peers/discovery")
            if not self.relay_compact_every_s > 0:
                raise SyncConfigError("sync.relay.compact_every: must be > 0")
        if self.ping_misses < 1:
            raise SyncConfigError("sync.ping_misses: must be at least 1")

    @property
    def dead_after_s(self) -> float:
        """How long a peer link may stay silent (or a handshake take) before it is dead."""
        return self.ping_interval_s * self.ping_misses

    @property
    def is_shared(self) -> bool:
        """True when state is shared with other instances (a token, peers or discovery).

        Without that the documents still rotate, to stay small, but nothing about
        sync is logged: the instance is on its own.
        """
        return (self.token is not None or bool(self.peers) or self.discovery is not None
                or self.relay_url is not None)

    def discovery_target(self) -> tuple[str, int] | None:
        """Return ``(host, port)`` from ``discovery``, or None when it is unset.

        Raises:
            SyncConfigError: the value is not ``dns:host[:port]``.
        """
        if self.discovery is None:
            return None
        if not self.discovery.startswith(_DNS_PREFIX):
            raise SyncConfigError(f"sync.discovery: {self.discovery!r} must be dns:host[:port]")
        rest = self.discovery[len(_DNS_PREFIX) :]
        host, sep, port = rest.rpartition(":")
        if not sep:
            host, port = rest, str(DEFAULT_SYNC_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SyncConfigError(f"sync.discovery: {self.discovery!r} must be dns:host[:port]")
        return host, int(port)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """One client session as every instance sees it."""

    id: str
    upstream: str | None
    created: float
    last_seen: float
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, session_id: str, value: Any, *, observed_at: float) -> Session | None:
        """Build from a ``sessions`` map value; None when it is not a dict.

        A value written by a foreign Yjs client may lack the times: they default
        to ``observed_at`` so the entry lives for one TTL from when we saw it.
        """
        if not isinstance(value, dict):
            return None
        upstream = value.get("upstream")
        attrs = value.get("attributes")
        return cls(
            id=session_id,
            upstream=str(upstream) if upstream is not None else None,
            created=_num(value.get("created"), observed_at),
            last_seen=_num(value.get("last_seen"), observed_at),
            attributes=(
                {str(k): str(v) for k, v in attrs.items()} if isinstance(attrs, dict) else {}
            ),
        )


@final
@dataclass(frozen=True, slots=True)
class Usage:
    """Requests and tokens counted for one client key, summed over all instances."""

    requests: int = 0
    tokens: int = 0


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class UsageBucket:
    """Requests and tokens counted for one client key in ``[start, end)``, all instances."""

    start: float
    end: float
    requests: int
    tokens: int


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamReport:
    """Health gossip about one upstream: what, until when, and who said so."""

    state: str
    until: float | None
    reporter: str

    @classmethod
    def from_wire(cls, value: Any) -> UpstreamReport | None:
        """Build from an ``upstreams`` map value; None when malformed."""
        if not isinstance(value, dict) or not isinstance(value.get("state"), str):
            return None
        until = value.get("until")
        return cls(
            state=value["state"],
            until=float(until) if isinstance(until, int | float) else None,
            reporter=str(value.get("reporter", "")),
        )


def _redacted(url: str) -> str:
    """``url`` with any password replaced (error messages may be logged)."""
    scheme, sep, rest = url.partition("://")
    _creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) else default
