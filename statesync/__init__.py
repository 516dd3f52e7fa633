"""Session state shared by all skyroute instances, synced over the Yjs protocol.

``proxy/`` builds one ``StateSync``, mounts its ``/sync/{doc}`` route, starts it and
uses ``StateSync.store`` (a ``SessionStore``) and ``StateSync.objects`` (an
``ObjectDirectory``). No pycrdt type crosses this boundary.
"""

from ._discovery import Resolve
from ._objects import ObjectDirectory
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
    "ObjectDirectory",
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
