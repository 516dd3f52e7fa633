"""Errors the data plane turns into OpenAI-shaped HTTP responses.

One root, ``ProxyError``; split on who is at fault, as h11 does:
``ClientRequestError`` (4xx, the request was wrong) and ``UpstreamError``
(503/504/429, the upstreams could not answer). Every error knows its status, the
OpenAI ``type`` and ``code``, and a message that says what was wrong and what to
do. Exactly one middleware (``proxy._app``) turns them into responses.
"""

from __future__ import annotations

import json
import math

from aiohttp import web


class ProxyError(Exception):
    """Root of every error the data plane answers a client with."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.headers = headers or {}

    def to_response(self, request_id: str | None = None) -> web.Response:
        """An OpenAI-shaped JSON error response for this error."""
        body = {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}
        headers = dict(self.headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        if request_id:
            headers["X-Request-ID"] = request_id
        return web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/json", headers=headers)


class ClientRequestError(ProxyError):
    """The client's request is wrong; ours to reject (4xx)."""

    status = 400
    type = "invalid_request_error"


class InvalidJSON(ClientRequestError):
    code = "invalid_json"


class InvalidApiKey(ClientRequestError):
    status = 401
    code = "invalid_api_key"


class NotFound(ClientRequestError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class AdminDisabled(ClientRequestError):
    """The admin API is off because no admin key is configured."""

    status = 403
    type = "permission_error"
    code = "admin_disabled"


class BodyTooLarge(ClientRequestError):
    status = 413
    code = "request_too_large"


class RateLimitExceeded(ClientRequestError):
    """A client key is over its rpm/tpm (429, with Retry-After and OpenAI's rate-limit
    headers for the limit that was hit)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class UpstreamError(ProxyError):
    """No upstream produced an answer: 503, 504 (the route's deadline passed) or 429 (every
    attempt was rate-limited), always with ``Retry-After``."""

    status = 503
    type = "upstream_error"
    code = "upstream_unavailable"

    def __init__(self, message: str, *, status: int = 503,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.status = status
        self.code = {429: "upstream_rate_limited", 504: "upstream_timeout"}.get(status,
                                                                              self.code)


class DegradedRefusal(ProxyError):
    """skyroute is in minimal mode and does not serve this request now (503, Retry-After).

    Not the upstreams' answer and not the client's mistake: the same request is
    served once enough upstreams are back.
    """

    status = 503
    type = "server_error"
    code = "minimal_mode"
