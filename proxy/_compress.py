"""Compression on the wire: whole (non-streaming) answers compressed for clients that ask.

Rules:

* Only a whole ``web.Response`` under ``/v1`` of at least ``cache.compression.min_bytes``
  (1 KiB by default) with no ``Content-Encoding`` of its own is compressed; SSE and
  other streamed answers never are (each event must reach the client when it is sent).
* The coding is the client's most preferred by ``Accept-Encoding`` q-values among
  ``br`` (the ``brotli`` package), ``zstd`` (``zstandard``) and ``gzip``; on a tie,
  in that order (smallest output first). ``q=0`` refuses a coding; ``*`` stands for
  any coding not named.
* Levels are chosen for speed: the answer is on the request path (brotli quality 4
  and zstd level 3 compress JSON to about a quarter in tens of microseconds a KiB).
* ``Vary: Accept-Encoding`` is set on every answer that could have been compressed.
* ``skyroute_compressed_responses_total{coding}`` and ``..._bytes_total{stage}`` count it.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from typing import Final

import brotli
import zstandard
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from ._state import METRICS, SERVING

_ZSTD: Final = zstandard.ZstdCompressor(level=3)
_COMPRESSORS: Final[dict[str, Callable[[bytes], bytes]]] = {
    "br": lambda data: brotli.compress(data, quality=4),
    "zstd": _ZSTD.compress,
    "gzip": lambda data: gzip.compress(data, compresslevel=5),
}
#: Tie-break order: the smaller output first.
_PREFERENCE: Final = ("br", "zstd", "gzip")


def choose_coding(accept_encoding: str) -> str | None:
    """The coding to send for ``accept_encoding``; None for identity."""
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        weights[name.strip().lower()] = q
    star = weights.get("*", 0.0)
    best, best_q = None, 0.0
    for coding in _PREFERENCE:
        q = weights.get(coding, star)
        if q > best_q:
            best, best_q = coding, q
    return best


class _CompressionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.responses = Counter("skyroute_compressed_responses",
                                 "Whole answers compressed for the client, by coding.",
                                 ["coding"], registry=registry)
        self.bytes = Counter("skyroute_compressed_bytes",
                             "Bytes of compressed answers, before (in) and after (out).",
                             ["stage"], registry=registry)


_METRICS = web.AppKey("compression_metrics", _CompressionMetrics)


def compress_answer(request: web.Request, resp: web.StreamResponse) -> None:
    """Compress a whole ``/v1`` answer being prepared, for a client that accepts it (run
    by the app's one ``on_response_prepare`` hook, ``proxy._app``)."""
    if not isinstance(resp, web.Response) or not request.path.startswith("/v1/"):
        return
    body = resp.body
    min_bytes = request.app[SERVING].runtime.config.cache.compression.min_bytes
    if not isinstance(body, bytes) or len(body) < min_bytes or \
            "Content-Encoding" in resp.headers:
        return
    resp.headers.add("Vary", "Accept-Encoding")
    coding = choose_coding(request.headers.get("Accept-Encoding", ""))
    if coding is None:
        return
    compressed = _COMPRESSORS[coding](body)
    resp.body = compressed
    resp.headers["Content-Encoding"] = coding
    if "Content-Length" in resp.headers:  # the upstream's, for the uncompressed body
        resp.headers["Content-Length"] = str(len(compressed))
    metrics = request.app[_METRICS]
    metrics.responses.labels(coding).inc()
    metrics.bytes.labels("in").inc(len(body))
    metrics.bytes.labels("out").inc(len(compressed))


def install_compression(app: web.Application) -> None:
    """Give ``app`` what ``compress_answer`` needs: its metrics."""
    app[_METRICS] = _CompressionMetrics(app[METRICS].registry)
