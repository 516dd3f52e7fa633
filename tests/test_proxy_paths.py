"""Request targets: only a plain path under /v1/ reaches an upstream, byte for byte."""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from skyroute.proxy import Server
from skyroute.proxy._errors import InvalidPath
from skyroute.proxy._paths import check_target, upstream_path, upstream_url

from .conftest import CLIENT_KEY, UPSTREAM_KEY
from .hostile import RecordingUpstream, raw_request


@pytest.fixture
async def recording() -> AsyncIterator[RecordingUpstream]:
    up = await RecordingUpstream().start()
    yield up
    await up.aclose()


def _yaml(up: RecordingUpstream) -> str:
    return (f"listen: 127.0.0.1:0\nauth: {{api_keys: [{{name: t, key: {CLIENT_KEY}}}]}}\n"
            f"upstreams:\n  - name: rec\n    url: {up.base_url}\n    api_key: {UPSTREAM_KEY}\n"
            "    models: {chat: chat}\nroutes: [{model: chat, targets: [rec]}]\n")


ESCAPES = [
    "/v1/../_stats", "/v1/%2e%2e/_stats", "/v1/%2E%2e/_stats", "/v1/a/../../x",
    "/v1/./models", "/v1/.%2e/x", "/v1/a/..", "/v1//x", "/v1/models/", "/v1/a\\..\\b",
    "/v1/a%5c..%5cb", "/v1/a%2f..%2fb", "/v1/a%00b", "/v1/%zz", "http://evil/v1/x",
    "//evil/v1/x", "/v1/x#frag", "/%761/files",
]


@pytest.mark.parametrize("target", ESCAPES)
async def test_escaping_target_gets_400_and_reaches_no_upstream(
        target: str, recording: RecordingUpstream,
        skyroute: Callable[..., Awaitable[Server]]) -> None:
    """Dot segments, empty segments, backslashes, odd escapes and absolute URLs: 400."""
    server = await skyroute(_yaml(recording))
    answer = await raw_request(server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n"
                                            f"Authorization: Bearer {CLIENT_KEY}")
    assert answer.status == 400, answer
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_path"
    assert recording.seen == []


async def test_upstream_gets_base_plus_the_path_as_sent(
        recording: RecordingUpstream, skyroute: Callable[..., Awaitable[Server]]) -> None:
    """A plain target reaches the upstream as configured base + the part below /v1."""
    server = await skyroute(_yaml(recording))
    answer = await raw_request(server.port, "GET /v1/files/file-a%20b?limit=2&x=%2e%2e HTTP/1.1"
                                            f"\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}")
    assert answer.status == 200
    [(method, path, headers)] = recording.seen
    assert (method, path) == ("GET", "/v1/files/file-a%20b?limit=2&x=%2e%2e")
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


# -- properties ------------------------------------------------------------------------

_SEGMENT_CHARS = st.sampled_from([*"aZ09-_.~%/\\#?", "%2e", "%2E", "%2f", "%5c", "%00", "..",
                                  "%41", "%zz"])


def _dot_free_normal(path: str) -> bool:
    decoded = unquote(path)
    return (posixpath.normpath(decoded) == decoded and "\\" not in decoded
            and "//" not in decoded)


@given(st.lists(_SEGMENT_CHARS, max_size=12).map("".join))
@example("../x")
@example("%2e%2e/%2e%2e/x")
@example("a/%2E./b")
def test_upstream_path_is_normalised_under_base(tail: str) -> None:
    """Whatever follows /v1/, an accepted target maps to base + a normal path below it."""
    target = "/v1/" + tail
    try:
        path_qs = upstream_path(target)
    except InvalidPath:
        return
    path = path_qs.partition("?")[0]
    assert _dot_free_normal(path), path
    url = upstream_url("http://up.example:8000/base/v1", path_qs)
    assert url.raw_path == "/base/v1" + path
    assert url.host == "up.example"
    assert url.raw_path.startswith("/base/v1/")


@given(st.text(max_size=40))
def test_check_target_never_raises_anything_but_InvalidPath(target: str) -> None:
    """Any string at all is either accepted or refused with InvalidPath."""
    with contextlib.suppress(InvalidPath):
        check_target(target)
