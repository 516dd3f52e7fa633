"""Near-identical prompts for the approximate cache: MinHash over word shingles, LSH bands, guards.

Rules / theory of operation
---------------------------
* By default only single-turn chat requests take part: at most one system message, then
  one user message with text content. A route with ``cache_multi_turn: true`` lets
  multi-turn chats in too (the last message still a user's text). Everything but that
  last user text (route, scope, earlier messages, parameters) must match exactly: it is
  hashed into the *context*, so a follow-up is only ever matched within the same chat.
* The user's text is normalised (lower case, words of letters and digits, punctuation
  and spacing dropped) and cut into overlapping 3-word shingles (a text of fewer
  words is one shingle). Its MinHash signature has ``PERMUTATIONS`` values; the share
  of equal values estimates the Jaccard similarity of two shingle sets.
* Candidates are found by LSH: the signature in ``BANDS`` bands of ``ROWS`` values,
  each band a bucket key, so pairs above about (1/BANDS)^(1/ROWS) = 0.5 similarity
  meet in some bucket; a candidate is accepted only when its estimated similarity is
  at least ``threshold``.
* The last ``TAIL_WORDS`` words (where a question usually is) must be near-identical on
  their own too: a long shared preamble must not carry a different question over the
  threshold ("... the capital of France?" against "... the capital of Germany?").
* A *guard* must match exactly: the numbers in the text and its negation words
  (``not``, ``no``, ``never``, ...). "What is 2+2" and "What is 2+3", or "is it safe"
  and "is it not safe", are never near-identical however long the rest is.
* The index keeps at most ``max_entries`` prompts, oldest dropped first; buckets are
  pruned of dropped prompts as they are read.

Pure: no clock, no I/O. The index is a plain in-memory structure the proxy owns.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, final

__all__ = ["ApproximateIndex", "ApproximateQuery", "approximate_query"]

PERMUTATIONS: Final = 64
BANDS: Final = 16
ROWS: Final = PERMUTATIONS // BANDS
_SHINGLE: Final = 3
TAIL_WORDS: Final = 12
_PRIME: Final = (1 << 61) - 1
_MASK: Final = (1 << 64) - 1
_rng = random.Random(15)  # fixed: signatures must agree across instances and restarts
_COEFFICIENTS: Final = tuple((_rng.randrange(1, _PRIME), _rng.randrange(0, _PRIME))
                             for _ in range(PERMUTATIONS))
_WORD: Final = re.compile(r"\w+")
_NEGATIONS: Final = frozenset({"not", "no", "never", "none", "nor", "neither", "cannot",
                               "without", "nothing", "nobody", "isn", "aren", "wasn", "weren",
                               "don", "doesn", "didn", "won", "wouldn", "can", "couldn",
                               "shouldn", "mustn", "haven", "hasn", "hadn", "t"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ApproximateQuery:
    """A single-turn request's context digest and its user text."""

    context: str
    text: str


def approximate_query(*, route: str, owner: str, body: Mapping[str, Any],
                      multi_turn: bool = False) -> ApproximateQuery | None:
    """The approximate form of a request body (``model``/``stream`` already left out);
    None when its last message is not a user's text, or (unless ``multi_turn``) when it
    is not single-turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    *earlier, last = messages
    if not isinstance(last, dict) or last.get("role") != "user" or \
            not isinstance(last.get("content"), str):
        return None
    if not multi_turn and (len(earlier) > 1 or (earlier and (
            not isinstance(earlier[0], dict) or earlier[0].get("role") != "system"))):
        return None
    rest = {k: v for k, v in body.items() if k != "messages"}
    canonical = json.dumps([route, owner, earlier, rest], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return ApproximateQuery(context=hashlib.sha256(canonical.encode()).hexdigest(),
                            text=last["content"])


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _guard(words: list[str]) -> tuple[str, ...]:
    return tuple(w for w in words if w in _NEGATIONS or any(c.isdigit() for c in w))


def _signature(words: list[str]) -> tuple[int, ...]:
    n = max(1, len(words) - _SHINGLE + 1)
    hashes = {int.from_bytes(hashlib.blake2b(" ".join(words[i:i + _SHINGLE]).encode(),
                                             digest_size=8).digest(), "big")
              for i in range(n)}
    return tuple(min(((a * h + b) % _PRIME) & _MASK for h in hashes)
                 for a, b in _COEFFICIENTS)


def similarity(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / PERMUTATIONS


@final
class ApproximateIndex:
    """Signatures of stored prompts by context, guard and LSH band; bounded."""

    __slots__ = ("_buckets", "_entries", "max_entries", "threshold")

    def __init__(self, *, threshold: float, max_entries: int) -> None:
        self.threshold = threshold
        self.max_entries = max_entries
        # key -> signatures of the whole text and of its tail
        self._entries: OrderedDict[str, tuple[tuple[int, ...], tuple[int, ...]]] = \
            OrderedDict()
        self._buckets: dict[tuple[str, tuple[str, ...], int, tuple[int, ...]], list[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<ApproximateIndex entries={len(self._entries)} threshold={self.threshold}>"

    def add(self, query: ApproximateQuery, key: str) -> None:
        """Remember that the exact cache key ``key`` holds the answer to ``query``."""
        words = _words(query.text)
        signature = _signature(words)
        self._entries[key] = (signature, _signature(words[-TAIL_WORDS:]))
        self._entries.move_to_end(key)
        guard = _guard(words)
        for band in range(BANDS):
            bucket = (query.context, guard, band, signature[band * ROWS:(band + 1) * ROWS])
            keys = self._buckets.setdefault(bucket, [])
            if key not in keys:
                keys.append(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def find(self, query: ApproximateQuery) -> tuple[str, float] | None:
        """The stored key most similar to ``query`` at or above ``threshold``, and the
        estimated similarity; None if there is none."""
        words = _words(query.text)
        signature = _signature(words)
        tail: tuple[int, ...] | None = None  # computed once a candidate is found
        guard = _guard(words)
        best: tuple[str, float] | None = None
        for band in range(BANDS):
            bucket = (query.context, guard, band, signature[band * ROWS:(band + 1) * ROWS])
            keys = self._buckets.get(bucket)
            if not keys:
                continue
            keys[:] = [k for k in keys if k in self._entries]  # prune dropped prompts
            if not keys:
                del self._buckets[bucket]
            for key in keys:
                whole, stored_tail = self._entries[key]
                score = similarity(signature, whole)
                if score < self.threshold or (best is not None and score <= best[1]):
                    continue
                tail = tail if tail is not None else _signature(words[-TAIL_WORDS:])
                if similarity(tail, stored_tail) >= self.threshold:
                    best = (key, score)
        return best
