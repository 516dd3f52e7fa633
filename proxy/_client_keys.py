"""The routing file's client keys, found in O(1) whatever their number.

Built once per config (at load and at each reload): a dict from the SHA-256 digest
of each key to its ``ApiKey``. A request hashes the key it carries once and looks
the digest up. Comparing digests, not keys, keeps the lookup's timing independent
of how much of a key an attacker guessed right: a near miss of the key is no near
miss of its digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import final

from skyroute.routing import ApiKey


@final
class ClientKeys:
    """Client keys by digest; ``find`` costs one SHA-256 and one dict lookup."""

    __slots__ = ("_by_digest",)

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._by_digest = {_digest(k.key): k for k in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, given: str) -> ApiKey | None:
        """The configured key equal to ``given``, or None."""
        return self._by_digest.get(_digest(given))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
