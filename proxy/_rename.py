"""Renaming the model in a JSON request body by splicing bytes, not re-encoding.

A route maps the client's model alias to each upstream's own name, so the body of
every attempt may need a different ``model``. Re-encoding the whole body costs in
proportion to its size (a long chat history) and on every failover attempt;
replacing the one string value costs nothing of the kind, and keeps the client's
bytes (spacing, non-ASCII text) as they were.

Rules: the splice is made only when it is provably the top-level ``model`` value,
else the body is re-encoded from the parsed payload (always right, just slower):

1. The bytes ``"model"`` occur exactly once. Inside a JSON string a quote is
   always escaped, so an occurrence is a key (or a value that is exactly "model").
2. No ``\\u`` escape of the letters m, o, d, e, l appears anywhere, so the top-level
   key cannot be spelt another way (``"mod\\u0065l"``) while the one literal
   occurrence sits in a nested object.
3. The occurrence is followed by ``:`` and a JSON string whose value is the
   parsed payload's ``model`` (the top-level value the route was chosen by).

Together these mean that the one literal ``"model"`` is the top-level key (the
payload has one, and it can only be spelt literally), and its value is replaced by
the JSON encoding of the new name.
"""

from __future__ import annotations

import json
import re
from typing import Any

_KEY = b'"model"'
#: A \\u escape that spells one of the letters of "model" (m o d e l: 6d 6f 64 65 6c).
_ESCAPED_LETTER = re.compile(rb"\\u00(?:6[4-5cdfCDF])")
#: ``: "value"`` after the key: the value a JSON string (escapes allowed).
_STRING_VALUE = re.compile(rb'\s*:\s*("(?:[^"\\]|\\.)*")')


def rename_model(body: bytes, payload: dict[str, Any], model: str) -> bytes:
    """``body`` with its top-level ``model`` set to ``model``.

    Args:
        body: the JSON object as the client sent it.
        payload: ``body`` parsed (``json.loads``); its ``model`` is the current value.
        model: the new name.

    Returns:
        The body with only the value's bytes replaced when that is provably right,
        else ``payload`` re-encoded with the new model.
    """
    start = body.find(_KEY)
    if start >= 0 and body.find(_KEY, start + 1) < 0 and not _ESCAPED_LETTER.search(body):
        value = _STRING_VALUE.match(body, start + len(_KEY))
        if value is not None and _is_string(value.group(1), payload.get("model")):
            return b"".join((body[:value.start(1)], json.dumps(model).encode(),
                             body[value.end(1):]))
    return json.dumps({**payload, "model": model}).encode()


def _is_string(encoded: bytes, expected: object) -> bool:
    """Whether the JSON string ``encoded`` is ``expected`` (most often spelt plainly)."""
    if not isinstance(expected, str):
        return False
    if b"\\" not in encoded:  # no escapes: the bytes between the quotes are the text
        return encoded[1:-1] == expected.encode()
    try:
        return bool(json.loads(encoded) == expected)
    except (ValueError, UnicodeDecodeError):
        return False
