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

    #: Close the client connection after answering (its request was not read whole).
    close_connection = False

    def to_response(self, request_id: str | None = None) -> web.Response:
        """An OpenAI-shaped JSON error response for this error."""
        body = {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}
        headers = dict(self.headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        if request_id:
            headers["X-Request-ID"] = request_id
        resp = web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/json", headers=headers)
        if self.close_connection:
            resp.force_close()
        return resp


class ClientRequestError(ProxyError):
    """The client's request is wrong; ours to reject (4xx)."""

    status = 400
    type = "invalid_request_error"


class InvalidJSON(ClientRequestError):
    code = "invalid_json"


class InvalidPath(ClientRequestError):
    """The request target is not a plain path under /v1/ (see ``proxy._paths``)."""

    code = "invalid_path"


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


class RequestTimeout(ClientRequestError):
    """The client stopped sending its request part-way (``limits.body_timeout``)."""

    status = 408
    code = "request_timeout"
    close_connection = True


class TooManyRequests(ClientRequestError):
    """A client key has as many requests in flight as it may (``max_concurrent``)."""

    status = 429
    type = "requests"
    code = "too_many_concurrent_requests"


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


class InternalError(ProxyError):
    """A bug in skyroute: answered 500, logged with its traceback (redacted)."""

    code = "internal_error"


#: Codes for the statuses aiohttp answers by itself (bad framing, no route, big body).
_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "request_too_large", 414: "uri_too_long",
               431: "request_header_fields_too_large"}


def http_error(status: int, message: str) -> ProxyError:
    """An OpenAI-shaped error for a status skyroute did not choose itself (aiohttp's).

    4xx are the client's mistake (``invalid_request_error``), anything else a
    ``server_error``.
    """
    error = ClientRequestError(message) if status < 500 else ProxyError(message)
    error.status = status
    error.code = _HTTP_CODES.get(status)
    return error
