"""Request targets: which ones skyroute serves, and the path an upstream receives.

Rules / theory of operation
---------------------------
skyroute attaches its own upstream key to what it forwards, so the path it sends
must be exactly the one it checked: the configured base URL plus the part of the
client's path below ``/v1``. Nothing is collapsed or decoded on the way, and a
target that some server along the way might read differently is refused with a
400 instead (``InvalidPath``):

* the request target must be in origin form (``/path?query``): absolute-form
  (``http://host/...``), authority-form and ``*`` are refused;
* no dot segment (``.``/``..``), raw or percent-encoded (``%2e%2E``), anywhere;
* no empty segment (``//``, or a trailing ``/``);
* no backslash, raw or encoded (``%5C``): some servers read it as ``/``;
* no encoded ``/`` (``%2F``), control byte or malformed escape in the path, and
  no ``#`` anywhere (fragments are never sent);
* an API path starts with the literal ``/v1/`` (not ``/%761/``).

``check_target`` applies the rules to every request (the error middleware calls
it first); ``upstream_path`` also returns the part below ``/v1`` with its query,
byte for byte as the client sent it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from yarl import URL

from ._errors import InvalidPath

API_PREFIX = "/v1/"
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|%(2[Ff]|5[Cc]|[01][0-9A-Fa-f]|7[Ff])")
_DOT_SEGMENT = re.compile(r"^(?:\.|%2[Ee]){1,2}$")
_FIX = "send the path as the OpenAI SDK does, e.g. /v1/chat/completions"


@lru_cache(maxsize=4096)
def _problem(target: str) -> str | None:
    """What is wrong with a raw request target, or None when it is served.

    Cached: clients send the same few targets over and over, and the error middleware
    and ``upstream_path`` both ask (a pure function of the text, so a cache is exact).
    """
    if not target.startswith("/") or target.startswith("//"):
        return ("the request target must be a path such as /v1/chat/completions "
                "(absolute URLs and other request-target forms are not accepted)")
    path, _, _query = target.partition("?")
    if "#" in target:
        return "the request target must not contain '#'"
    if "\\" in path:
        return "the path must not contain a backslash"
    bad = _ESCAPE.search(path)
    if bad is not None:
        escape = path[bad.start():bad.start() + 3]
        return (f"the path must not contain the escape {escape!r} (a malformed escape, an "
                "encoded '/' or '\\', or a control byte)")
    if "//" in path or (path.endswith("/") and path != "/"):
        return "the path must not contain empty segments ('//' or a trailing '/')"
    for segment in path.split("/"):
        if segment and _DOT_SEGMENT.match(segment):
            return "the path must not contain '.' or '..' segments (raw or percent-encoded)"
    return None


def check_target(target: str) -> None:
    """Refuse a request target that could mean another path to someone else.

    Raises:
        InvalidPath: with what was wrong (400, ``invalid_path``).
    """
    problem = _problem(target)
    if problem is not None:
        raise InvalidPath(f"{problem}; {_FIX}", param="path")


def upstream_path(target: str) -> str:
    """The part of ``target`` below ``/v1`` with its query, as sent (``/chat/completions``).

    Raises:
        InvalidPath: the target breaks a rule above or is not under ``/v1/``.
    """
    check_target(target)
    if not target.startswith(API_PREFIX):
        raise InvalidPath(f"the OpenAI API is served under /v1/; {_FIX}", param="path")
    return target[len(API_PREFIX) - 1:]


def upstream_url(endpoint: str, path_qs: str) -> URL:
    """The URL an attempt goes to: ``endpoint`` (a configured base URL) plus ``path_qs``.

    ``path_qs`` comes from ``upstream_path``; it is passed on as is (``encoded``),
    so nothing between here and the socket normalises it into another path.
    """
    return URL(_encoded_base(endpoint) + path_qs, encoded=True)


@lru_cache(maxsize=256)
def _encoded_base(endpoint: str) -> str:
    return str(URL(endpoint)).rstrip("/")
