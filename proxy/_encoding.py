"""Answers an upstream compressed although asked not to: decode them, or pass them on whole.

skyroute asks every upstream for ``Accept-Encoding: identity``, because it reads
answers as they pass (busy keep-alives, the end of a stream, token usage, the ids of
created objects). An upstream that compresses anyway is handled here:

* ``gzip``, ``x-gzip`` and ``deflate`` are decoded as the bytes arrive (zlib, in
  constant memory) and reach the client without ``Content-Encoding``: bytes and
  header always agree, and every client can read them.
* Any other coding (``br``, ``zstd``) is passed on untouched, header included, when
  the client's ``Accept-Encoding`` allows it; otherwise the attempt fails with a
  message naming the coding, and the next upstream is tried.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Final, final

_ZLIB_CODINGS: Final = frozenset({"gzip", "x-gzip", "deflate"})
#: zlib's wbits for "gzip or zlib header, detected"; raw deflate (no header) is the
#: fallback some servers send as ``deflate``.
_AUTO_HEADER: Final = 32 + zlib.MAX_WBITS


@final
class Decoder:
    """Incremental decoder for one gzip/deflate body."""

    __slots__ = ("_first", "_zlib")

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(_AUTO_HEADER)
        self._first = True

    def decompress(self, chunk: bytes) -> bytes:
        """Decode the next piece.

        Raises:
            zlib.error: the bytes are not what the coding says.
        """
        first, self._first = self._first, False
        try:
            return self._zlib.decompress(chunk)
        except zlib.error:
            if not first:
                raise
            # The header check failed on the first bytes: 'deflate' without its zlib
            # header, which some servers send.
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._zlib.decompress(chunk)

    def flush(self) -> bytes:
        return self._zlib.flush()


def content_coding(headers: Mapping[str, str]) -> str:
    """The answer's ``Content-Encoding``, lower-case; "" for identity."""
    value = headers.get("Content-Encoding", "").strip().lower()
    return "" if value == "identity" else value


def decoder_for(coding: str) -> Decoder | None:
    """A decoder for ``coding``; None when skyroute cannot decode it."""
    return Decoder() if coding in _ZLIB_CODINGS else None


def accepts(accept_encoding: str, coding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows ``coding`` (``q=0`` refuses it)."""
    for item in accept_encoding.lower().split(","):
        name, _, params = item.strip().partition(";")
        if name.strip() in (coding, "*"):
            q = params.strip()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False
