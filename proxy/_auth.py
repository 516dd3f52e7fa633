"""Whether a request carries the admin key.

Client keys are checked in ``proxy._handlers`` (``authenticate``); the admin key
guards ``/admin/*`` (``proxy._admin``) and the detailed view of ``/health``.
Comparisons take the same time whatever the key (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from ._headers import bearer_token


def is_admin(request: web.Request, admin_key: str | None) -> bool:
    """Whether the request carries ``admin_key`` (False when none is configured)."""
    given = bearer_token(request)
    if not admin_key or given is None:
        return False
    return hmac.compare_digest(given.encode(), admin_key.encode())
