"""Prometheus metrics and the structured logger for state sync.

Every metric is registered on the registry handed to ``StateSync`` (never the
global one), so several instances can live in one process, as the tests and the
benchmark do. Label values are a small closed set: ``direction`` is in/out,
``type`` is one of ``MESSAGE_TYPES``, ``doc`` one of ``DOC_NAMES``, ``outcome``
is ok/failed.
"""

from __future__ import annotations

from typing import Final, final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LOGGER_NAME: Final = "skyroute.statesync"

MESSAGE_TYPES: Final = (
    "sync_step1",
    "sync_step2",
    "sync_update",
    "awareness",
    "query_awareness",
    "auth",
    "control",
    "unknown",
)

# Loopback sync takes well under a millisecond; cross-cloud up to the seed's 300 ms bar.
_APPLY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0, 5.0, 30.0)


def get_logger() -> structlog.stdlib.BoundLogger:
    """Return the package logger; callers bind ``peer`` and ``doc``, never the token."""
    return structlog.get_logger(LOGGER_NAME)  # type: ignore[no-any-return]


@final
class SyncMetrics:
    """The sync metrics, registered once per ``StateSync`` on its registry.

    Each gauge names how ``--workers`` processes combine (prometheus_client's
    multiprocess mode): links add up, the shared document's figures are the same
    on every worker (the largest is shown).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.peers_connected = Gauge(
            "skyroute_sync_peers_connected",
            "Outbound peer links currently connected (one per peer and document).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.messages = Counter(
            "skyroute_sync_messages_total",
            "y-protocols messages sent and received.",
            ["direction", "type"],
            registry=registry,
        )
        self.bytes = Counter(
            "skyroute_sync_bytes_total",
            "WebSocket payload bytes sent and received by sync links.",
            ["direction"],
            registry=registry,
        )
        self.apply_seconds = Histogram(
            "skyroute_sync_update_apply_seconds",
            "Time to apply one received Yjs update to the local document.",
            buckets=_APPLY_BUCKETS,
            registry=registry,
        )
        self.objects = Gauge(
            "skyroute_sync_objects",
            "Stateful objects (files, batches, responses, ...) whose upstream is known, in "
            "the shared map.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.sessions = Gauge(
            "skyroute_sync_sessions",
            "Sessions in the shared sessions map (until rotation drops those past the TTL).",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.document_bytes = Gauge(
            "skyroute_sync_document_bytes",
            "Encoded size of the current epoch's document.",
            ["doc"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.lag_seconds = Histogram(
            "skyroute_sync_lag_seconds",
            "Time from a heartbeat's write on its origin instance to its apply here.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.auth_failures = Counter(
            "skyroute_sync_auth_failures_total",
            "Inbound sync connections refused for a missing or wrong token.",
            registry=registry,
        )
        self.epoch = Gauge(
            "skyroute_sync_epoch",
            "Current document epoch (documents are rebuilt when it changes).",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.updates_rejected = Counter(
            "skyroute_sync_updates_rejected",
            "Remote updates dropped whole (and their connection closed), by document and "
            "reason: schema, value_size, document_size or unknown_root.",
            ["doc", "reason"],
            registry=registry,
        )
        self.sessions_evicted = Counter(
            "skyroute_sync_sessions_evicted",
            "Sessions removed, oldest first, to keep the sessions map under max_sessions.",
            registry=registry,
        )
        self.rotation_failures = Counter(
            "skyroute_sync_rotation_failures",
            "Epoch rotations that failed and left every document in the old epoch.",
            registry=registry,
        )
        self.rotations = Counter(
            "skyroute_sync_rotations_total",
            "Document rotations into a new epoch.",
            registry=registry,
        )
        self.rotation_entries = Counter(
            "skyroute_sync_rotation_entries_total",
            "Entries a rotation carried into the new epoch, by how: shared (settled: the same "
            "item on every instance), own (written by this instance), writer (recent: left to "
            "the linked instance that wrote it), late (its writer's copy never came, so this "
            "instance carried it when the overlap ended), in_flight (written by a peer just before "
            "it rotated and received after this instance did: written into the new epoch on "
            "receipt), drop (expired).",
            ["how"],
            registry=registry,
        )
        self.discovery_lookups = Counter(
            "skyroute_sync_discovery_lookups_total",
            "DNS discovery lookups of sync.discovery, by outcome (ok, failed).",
            ["outcome"],
            registry=registry,
        )
        self.discovered_peers = Gauge(
            "skyroute_sync_discovered_peers",
            "Addresses in the last successful DNS discovery answer (this instance's included).",
            multiprocess_mode="livemax",
            registry=registry,
        )

        self.links_silent = Counter(
            "skyroute_sync_links_silent_total",
            "Peer links closed because the peer answered no ping for ping_misses intervals.",
            registry=registry,
        )
        self.ping_seconds = Histogram(
            "skyroute_sync_ping_seconds",
            "Round trip of application-level pings on peer links.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )

        self.pin_conflicts = Counter(
            "skyroute_sync_pin_conflicts_total",
            "Remote session writes that pinned another upstream than the one held here; the "
            "pin rule keeps the later move, else the earliest pin (a follow-up raced a pin).",
            registry=registry,
        )

        self.relay_compactions = Counter(
            "skyroute_sync_relay_compactions_total",
            "Relay streams (sync.relay) compacted into a snapshot and trimmed by this instance.",
            registry=registry,
        )

        # labels() costs a lock and a dict lookup; this is on the per-message path.
        self._message_children = {
            (d, t): self.messages.labels(d, t) for d in ("in", "out") for t in MESSAGE_TYPES
        }
        self._byte_children = {d: self.bytes.labels(d) for d in ("in", "out")}
        for how in ("shared", "own", "writer", "late", "in_flight", "drop"):
            self.rotation_entries.labels(how)
        for outcome in ("ok", "failed"):
            self.discovery_lookups.labels(outcome)  # exported as 0 before the first lookup

    def count_message(self, direction: str, kind: str, size: int) -> None:
        """Record one message of ``kind`` (see ``MESSAGE_TYPES``) and its size."""
        self._message_children[direction, kind].inc()
        self._byte_children[direction].inc(size)
