"""Checking every update a peer sends before it touches a document.

Rules / theory of operation
---------------------------
Anyone holding the sync token can send Yjs updates, and a CRDT update cannot be
taken back once applied (undoing it is another write, which every peer
receives). So a remote update is first applied to a *shadow*: a second pycrdt
document that holds exactly what the real one holds. The changes it makes there
are checked against the documents' schema; only an update whose every change
passes is applied to the real document, and a failing one is dropped whole
(``UpdateRejected``: the connection that sent it is closed, the rejection
counted). The shadow, now holding the bad update, is rebuilt from the real
document. Every committed change of the real document (local writes included)
is applied to the shadow too, so the two never drift.

The schema (``SCHEMAS``): each root map's values are JSON objects whose fields
have the listed types; strings and keys are short; numbers are finite (``inf``
made rotation fail once); counts are whole; no nested CRDT types; no root other
than the document's own maps; an encoded value is at most
``SyncSettings.max_value_bytes``; the document at most ``max_document_bytes``
(its measured size plus what accepted updates added since).

Limitation: an update whose items wait for a missing dependency is not visible
(and so not checked) until the dependency arrives; the update that completes it
is then checked with it, and rejected if either part is bad.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, final

from pycrdt import Doc, Map, MapEvent

from ._types import SyncProtocolError

MAX_KEY_CHARS: Final = 256
MAX_STRING_CHARS: Final = 256
MAX_ATTRIBUTES: Final = 32
_MAX_WHOLE: Final = 2.0**53  # the largest whole number a float64 holds exactly


class UpdateRejected(SyncProtocolError):
    """A remote update broke the documents' schema or size limits; nothing was applied.

    ``reason`` is one of ``REJECT_REASONS`` (a metric label).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"bad update: {message}")  # "bad": closed with CLOSE_PROTOCOL
        self.reason = reason


REJECT_REASONS: Final = ("schema", "value_size", "document_size", "unknown_root")

Check = Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _whole(value: Any) -> bool:
    return _number(value) and float(value).is_integer() and abs(value) < _MAX_WHOLE


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_STRING_CHARS


def _optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def _attributes(value: Any) -> bool:
    return isinstance(value, dict) and len(value) <= MAX_ATTRIBUTES and all(
        _text(k) and _text(v) for k, v in value.items())


def _pin(value: Any) -> bool:
    """A session's pin stamp (``_pins.PinStamp.to_wire``): generation, HLC, writer."""
    if not isinstance(value, dict) or set(value) != {"gen", "at", "by"}:
        return False
    at = value["at"]
    return _whole(value["gen"]) and value["gen"] >= 0 and _text(value["by"]) \
        and isinstance(at, list) and len(at) == 2 and all(_whole(n) for n in at)


#: map name -> (field -> check, required fields). Fields outside the table are refused.
SCHEMAS: Final[dict[str, tuple[dict[str, Check], frozenset[str]]]] = {
    # A foreign Yjs client may write a session with only some fields.
    "sessions": ({"upstream": _optional(_text), "created": _number, "last_seen": _number,
                  "attributes": _attributes, "ts": _number, "by": _text, "pin": _pin},
                 frozenset()),
    "upstreams": ({"state": _text, "until": _optional(_number), "reporter": _text,
                   "ts": _number}, frozenset({"state"})),
    "objects": ({"upstream": _text, "until": _number, "ts": _number, "by": _text},
                frozenset({"upstream"})),
    "usage": ({"key": _text, "b": _whole, "s": _positive, "w": _text, "r": _whole,
               "t": _whole},
              frozenset({"key", "b", "w"})),
    "meta": ({"ts": _number, "instance": _text}, frozenset({"ts"})),
}


def check_value(map_name: str, key: str, value: Any, *, max_value_bytes: int) -> None:
    """Raise ``UpdateRejected`` unless ``value`` may be stored under ``key`` in ``map_name``."""
    where = f"{map_name}[{key[:40]!r}]"
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
        raise UpdateRejected("schema", f"{map_name}: a key longer than {MAX_KEY_CHARS}")
    if isinstance(value, Map) or not isinstance(value, dict):
        raise UpdateRejected("schema", f"{where}: must be a JSON object, not "
                                       f"{type(value).__name__}")
    fields, required = SCHEMAS[map_name]
    missing = required - value.keys()
    if missing:
        raise UpdateRejected("schema", f"{where}: missing {sorted(missing)}")
    for name, field in value.items():
        check = fields.get(name)
        if check is None:
            raise UpdateRejected("schema", f"{where}: unknown field {str(name)[:40]!r}")
        if not check(field):
            raise UpdateRejected("schema", f"{where}.{name}: wrong type or out of range")
    size = len(json.dumps(value))
    if size > max_value_bytes:
        raise UpdateRejected("value_size", f"{where}: {size} bytes, over the limit of "
                                           f"{max_value_bytes}")


@final
class UpdateGate:
    """The shadow of one document: remote updates are tried on it first."""

    def __init__(self, source: Doc[Any], map_names: tuple[str, ...], *, max_value_bytes: int,
                 max_document_bytes: int) -> None:
        self._map_names = map_names
        self._max_value_bytes = max_value_bytes
        self._max_document_bytes = max_document_bytes
        self.size = len(source.get_update())
        self._changes: list[tuple[str, Mapping[str, Any]]] = []
        self._shadow = self._copy(source)

    def __repr__(self) -> str:
        return f"<UpdateGate size={self.size}>"

    def _copy(self, source: Doc[Any]) -> Doc[Any]:
        shadow: Doc[Any] = Doc()
        self._maps = [(name, shadow.get(name, type=Map)) for name in self._map_names]
        # Observed only while checking (``check``): what the real document holds needs no
        # check, and an observer would turn all of it into Python values (seconds at
        # 100,000 sessions), as it would every local write that ``follow`` takes.
        shadow.apply_update(source.get_update())
        self._changes.clear()
        return shadow

    def _observer(self, name: str) -> Callable[[MapEvent], None]:
        def observer(event: MapEvent) -> None:  # one parameter: see _doc.EpochDoc
            self._changes.append((name, event.keys))  # type: ignore[attr-defined]

        return observer

    def check(self, update: bytes, source: Doc[Any]) -> None:
        """Raise ``UpdateRejected`` unless ``update`` may be applied to ``source``.

        On rejection the shadow is rebuilt from ``source`` (which is unchanged).
        """
        if self.size + len(update) > self._max_document_bytes:
            raise UpdateRejected("document_size",
                                 f"the document would pass {self._max_document_bytes} bytes")
        self._changes.clear()
        # Observed only while checking: following the real document (every local write)
        # then costs no event conversion.
        subscriptions = [(ymap, ymap.observe(self._observer(name))) for name, ymap in self._maps]
        try:
            self._shadow.apply_update(update)
            extra = set(self._shadow.keys()) - set(self._map_names)
            if extra:
                raise UpdateRejected("unknown_root", f"an update created root(s) "
                                                     f"{sorted(extra)[:3]}")
            for map_name, keys in self._changes:
                for key, change in keys.items():
                    if change.get("action") != "delete":
                        check_value(map_name, key, change.get("newValue"),
                                    max_value_bytes=self._max_value_bytes)
        except UpdateRejected:
            self._shadow = self._copy(source)
            raise
        except Exception as exc:  # pycrdt rejected the bytes: the real doc would too
            self._shadow = self._copy(source)
            raise SyncProtocolError(f"update does not decode: {exc!r}") from exc
        finally:
            for ymap, subscription in subscriptions:
                ymap.unobserve(subscription)
            self._changes.clear()

    def follow(self, update: bytes) -> None:
        """Take a change committed to the real document (a no-op if already checked here)."""
        self._shadow.apply_update(update)
        self._changes.clear()
        self.size += len(update)

    def measured(self, size: int) -> None:
        """The real document's encoded size, measured now."""
        self.size = size
