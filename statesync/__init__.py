"""Session state shared by all skyroute instances, synced over the Yjs protocol.

``proxy/`` builds one ``StateSync``, mounts its ``/sync/{doc}`` route, starts it and
uses ``StateSync.store`` (a ``SessionStore``). No pycrdt type crosses this boundary.
"""

from ._discovery import Resolve
from ._store import SessionStore
from ._sync import StateSync
from ._types import (
    DOC_NAMES,
    LinkState,
    PeerLinkError,
    Session,
    SnapshotError,
    StateSyncError,
    SyncConfigError,
    SyncProtocolError,
    SyncSettings,
    UpstreamReport,
    Usage,
    UsageBucket,
)

__all__ = [
    "DOC_NAMES",
    "LinkState",
    "PeerLinkError",
    "Resolve",
    "Session",
    "SessionStore",
    "SnapshotError",
    "StateSync",
    "StateSyncError",
    "SyncConfigError",
    "SyncProtocolError",
    "SyncSettings",
    "UpstreamReport",
    "Usage",
    "UsageBucket",
]
