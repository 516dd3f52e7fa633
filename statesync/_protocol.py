"""The y-protocols conversation on one connection, with no I/O (h11-style).

Rules / theory of operation
---------------------------
A ``YConnection`` is one side of a y-websocket conversation about one document.
Bytes come in through ``receive_message``; the messages to send back are returned.
Messages the document produces on its own (a local write, or an update that came in
on another connection) are pushed through ``push``, which hands them to the
``on_send`` callback the I/O shell supplied; the shell only moves bytes.

Both sides open with SYNC_STEP1 (our state vector). A SYNC_STEP1 is answered with
SYNC_STEP2 (everything the other side lacks); SYNC_STEP2 and SYNC_UPDATE are
applied to the document with this connection as origin, so the document relays
them to every *other* connection and never echoes them back. Re-applying an update
already known changes nothing and produces no event, so relays terminate even in a
full mesh.

Awareness is answered as y-websocket's server does: an awareness update is applied
to the document's awareness and relayed to every external client, the sender
included (a stock client closes a link that stays silent for 30 s), and a query is
answered with all known states. Peer links (instance to instance) carry no awareness.

Any error while handling a message moves the connection to CLOSED and raises
``SyncProtocolError``; later calls raise at once, and the shell drops the socket.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final, Protocol, final

from pycrdt import (
    Decoder,
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    create_update_message,
    read_message,
)

from ._types import SyncProtocolError

_QUERY_AWARENESS: Final = 3
_AUTH: Final = 2
_EMPTY_UPDATE: Final = b"\x00\x00"

_SYNC_KINDS: Final[dict[int, str]] = {
    YSyncMessageType.SYNC_STEP1: "sync_step1",
    YSyncMessageType.SYNC_STEP2: "sync_step2",
    YSyncMessageType.SYNC_UPDATE: "sync_update",
}


def message_kind(message: bytes) -> str:
    """Name a message's type for metrics (one of ``_metrics.MESSAGE_TYPES``)."""
    if not message:
        return "unknown"
    if message[0] == YMessageType.SYNC:
        return _SYNC_KINDS.get(message[1], "unknown") if len(message) > 1 else "unknown"
    return {
        YMessageType.AWARENESS: "awareness",
        _QUERY_AWARENESS: "query_awareness",
        _AUTH: "auth",
    }.get(message[0], "unknown")


def update_message(update: bytes) -> bytes:
    """Wrap a Yjs update as a SYNC_UPDATE message."""
    return create_update_message(update)


def update_of(message: bytes) -> bytes | None:
    """The Yjs update a SYNC_STEP2 or SYNC_UPDATE message carries; None for any other message.

    Raises:
        SyncProtocolError: the message is truncated.
    """
    if len(message) < 2 or message[0] != YMessageType.SYNC or message[1] not in (
            YSyncMessageType.SYNC_STEP2, YSyncMessageType.SYNC_UPDATE):
        return None
    try:
        return read_message(message[2:])
    except (ValueError, IndexError, RuntimeError) as exc:
        raise SyncProtocolError(f"truncated sync message: {exc!r}") from exc


def decode_state_vector(state: bytes) -> dict[int, int]:
    """Decode a Yjs state vector into ``{client_id: clock}``.

    Raises:
        SyncProtocolError: the bytes are not a state vector.
    """
    try:
        decoder = Decoder(state)
        count = decoder.read_var_uint()
        result: dict[int, int] = {}
        for _ in range(count):
            client = decoder.read_var_uint()
            result[client] = decoder.read_var_uint()
        return result
    except (IndexError, RuntimeError) as exc:
        raise SyncProtocolError("malformed state vector") from exc


class DocEndpoint(Protocol):
    """What a connection needs from the document hub it is attached to."""

    def sync_step1(self) -> bytes: ...

    def answer_step1(self, state_vector: bytes, origin: YConnection) -> bytes: ...

    def apply_remote(self, update: bytes, origin: YConnection) -> None: ...

    def on_awareness(self, payload: bytes, origin: YConnection) -> None: ...

    def awareness_snapshot(self) -> bytes | None: ...


class ConnState(enum.Enum):
    """A connection is OPEN until an error or a close, then CLOSED for good."""

    OPEN = "open"
    CLOSED = "closed"


@final
class YConnection:
    """One side of a y-protocols conversation about one document.

    Args:
        hub: the document this connection reads and writes.
        name: a label for logs (peer URL or remote address).
        external: True for a Yjs client (awareness is relayed to it), False for a
            peer instance.
        on_send: called with every message to send that was not a direct reply
            (bytes: y-protocols; str: a control frame, see ``_control``).
        on_close: called once when the connection moves to CLOSED (the shell then
            closes its socket).
    """

    __slots__ = (
        "_hub",
        "_on_close",
        "_on_send",
        "close_reason",
        "external",
        "name",
        "peer",
        "peer_epoch",
        "peer_links",
        "rotates_in_band",
        "state",
    )

    def __init__(
        self,
        hub: DocEndpoint,
        *,
        name: str,
        external: bool,
        on_send: Callable[[bytes | str], None],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._hub = hub
        self._on_send = on_send
        self._on_close = on_close
        self.name = name
        self.external = external
        self.state = ConnState.OPEN
        self.close_reason: str | None = None
        self.peer: str | None = None
        """Peer instance id once known (inbound: ``?instance``; outbound: the hello)."""
        self.peer_links: frozenset[str] | None = None
        """The instances the peer says it is directly linked to (``_relay``); None: unknown."""
        self.peer_epoch: int | None = None
        """The epoch the peer's messages on this connection belong to (peer connections)."""
        self.rotates_in_band = False
        """The peer follows a rotation on the open connection (``{"epoch": N}`` frames)."""

    def __repr__(self) -> str:
        kind = "external" if self.external else "peer"
        return f"<YConnection {self.name} {kind} {self.state.name}>"

    def initial_messages(self) -> list[bytes]:
        """Messages to send as soon as the socket is open: our SYNC_STEP1 (+ awareness)."""
        self._check_open("initial_messages")
        out = [self._hub.sync_step1()]
        if self.external:
            snapshot = self._hub.awareness_snapshot()
            if snapshot is not None:
                out.append(create_awareness_message(snapshot))
        return out

    def receive_message(self, message: bytes) -> list[bytes]:
        """Handle one incoming message; return the direct replies to send back.

        Raises:
            SyncProtocolError: the message is malformed or its update cannot be
                applied; the connection is then CLOSED and must be dropped.
        """
        self._check_open("receive_message")
        try:
            return self._dispatch(message)
        except SyncProtocolError as exc:
            self.close(str(exc))
            raise
        except (ValueError, IndexError, RuntimeError, AssertionError) as exc:
            self.close(f"bad message: {exc}")
            raise SyncProtocolError(f"bad message from {self.name}: {exc!r}") from exc

    def _dispatch(self, message: bytes) -> list[bytes]:
        if not message:
            raise SyncProtocolError("empty message")
        kind = message[0]
        if kind == YMessageType.SYNC:
            return self._on_sync(message[1:])
        if kind == YMessageType.AWARENESS:
            self._hub.on_awareness(read_message(message[1:]), self)
            return []
        if kind == _QUERY_AWARENESS:
            snapshot = self._hub.awareness_snapshot()
            return [create_awareness_message(snapshot)] if snapshot is not None else []
        if kind == _AUTH:
            return []  # y-protocols auth messages are server-to-client only; ignore
        raise SyncProtocolError(f"unknown message type {kind}")

    def _on_sync(self, body: bytes) -> list[bytes]:
        if not body:
            raise SyncProtocolError("truncated sync message")
        sub, payload = body[0], read_message(body[1:])
        if sub == YSyncMessageType.SYNC_STEP1:
            return [self._hub.answer_step1(payload, self)]
        if sub in (YSyncMessageType.SYNC_STEP2, YSyncMessageType.SYNC_UPDATE):
            if payload != _EMPTY_UPDATE:
                self._hub.apply_remote(payload, self)
            return []
        raise SyncProtocolError(f"unknown sync message type {sub}")

    def push(self, message: bytes) -> None:
        """Queue a message produced elsewhere (relay or local write); dropped if CLOSED."""
        if self.state is ConnState.OPEN:
            self._on_send(message)

    def push_control(self, frame: str) -> None:
        """Queue a control frame (peer connections only); dropped if CLOSED."""
        if self.state is ConnState.OPEN and not self.external:
            self._on_send(frame)

    def close(self, reason: str) -> None:
        """Move to CLOSED (idempotent); the first reason is kept."""
        if self.state is ConnState.OPEN:
            self.state = ConnState.CLOSED
            self.close_reason = reason
            if self._on_close is not None:
                self._on_close()

    def _check_open(self, call: str) -> None:
        if self.state is not ConnState.OPEN:
            raise SyncProtocolError(f"{call}() called on a closed connection ({self.close_reason})")


__all__ = [
    "ConnState",
    "DocEndpoint",
    "YConnection",
    "decode_state_vector",
    "message_kind",
    "update_message",
    "update_of",
]
