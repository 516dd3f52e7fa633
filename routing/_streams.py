"""Streamed answers: whether a cut one may go on elsewhere, and how many tokens one used.

Rules / Theory of operation
---------------------------
* **Resume** (a route's ``resume: true``): a chat stream cut part-way continues on
  the next upstream, which is sent the partial answer as an assistant prefix. That
  works only when the prefix says everything the client has been sent: a chat
  request (``messages``) asking for one choice (``n`` absent or 1), whose stream
  so far is text only (one choice, no tool or function calls) and not finished (no
  ``finish_reason`` yet: a finished answer has nothing left to continue). Anything
  else ends with the error event, as without ``resume``.
* **Tokens of a stream** (for ``tpm``): what the upstreams reported
  (``usage.total_tokens``, sent only when the request asked with
  ``stream_options``), else an estimate: a token per 4 bytes of the request (the
  usual ratio for English text with OpenAI-style tokenizers) plus one per content
  chunk (servers we know send a token per chunk).

The proxy reads the stream and the request; it hands the facts in as plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

#: Bytes of request per estimated prompt token.
BYTES_PER_TOKEN: Final = 4


def is_resumable(*, resume: bool, payload: Mapping[str, Any] | None, text_only: bool,
                 finished: bool) -> bool:
    """Whether a stream cut part-way may continue on another upstream.

    Args:
        resume: the route's ``resume`` setting.
        payload: the client's request body (None: not JSON or empty).
        text_only: the stream so far has one choice and no tool or function calls.
        finished: a choice of the stream already carried a ``finish_reason``.
    """
    return (resume and payload is not None and isinstance(payload.get("messages"), list)
            and payload.get("n") in (None, 1) and text_only and not finished)


def streamed_tokens(*, reported: int, request_bytes: int, content_chunks: int) -> int:
    """Tokens a streamed answer used: as reported (when > 0), else the estimate above."""
    return reported or request_bytes // BYTES_PER_TOKEN + content_chunks
