"""routing._cache: what is cacheable, the canonical key, Cache-Control, freshness, storing."""

from __future__ import annotations

from typing import Any

import pytest
from skyroute.routing import (
    CacheLookup,
    CacheMode,
    CachePolicy,
    CacheScope,
    Freshness,
    NotCacheable,
    cache_directives,
    cache_lookup,
    freshness,
    is_storable,
    parse_config,
)

ASK = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def _lookup(payload: dict[str, Any] | None = None, *, mode: CacheMode = CacheMode.EXACT,
            scope: CacheScope = CacheScope.KEY, client: str | None = "one",
            path: str = "/chat/completions", method: str = "POST",
            cache_control: str | None = None, route: str = "chat") -> CacheLookup | NotCacheable:
    return cache_lookup(route=route, mode=mode, scope=scope, method=method, path=path,
                        payload=ASK if payload is None else payload, client=client,
                        cache_control=cache_control)


def _key(**kwargs: Any) -> str:
    found = _lookup(**kwargs)
    assert isinstance(found, CacheLookup), found
    return found.key


NOT_CACHEABLE_CASES = [
    ({"mode": CacheMode.OFF}, "off"),
    ({"path": "/embeddings"}, "endpoint"),
    ({"path": "/chat/completions?x=1"}, "endpoint"),
    ({"method": "GET"}, "endpoint"),
    ({"payload": {**ASK, "temperature": 0.7}}, "sampled"),
    ({"payload": {k: v for k, v in ASK.items() if k != "temperature"}}, "sampled"),
    ({"payload": {**ASK, "logprobs": True}}, "logprobs"),
    ({"cache_control": "no-store"}, "no-store"),
]


@pytest.mark.parametrize(("kwargs", "reason"), NOT_CACHEABLE_CASES)
def test_cache_lookup_not_cacheable(kwargs: dict[str, Any], reason: str) -> None:
    """Off routes, other endpoints, sampled requests, logprobs and no-store are not cached."""
    found = _lookup(**kwargs)
    assert isinstance(found, NotCacheable)
    assert found.reason == reason


def test_cache_lookup_deterministic_by_seed_or_always() -> None:
    """A seed makes a sampled request deterministic; cache: always takes it anyway."""
    sampled = {**ASK, "temperature": 0.9}
    assert isinstance(_lookup({**sampled, "seed": 7}), CacheLookup)
    assert isinstance(_lookup(sampled, mode=CacheMode.ALWAYS), CacheLookup)


def test_cache_key_ignores_stream_user_metadata_and_key_order() -> None:
    """Stream and non-stream share a key; user, metadata and key order do not matter."""
    base = _key()
    assert _key(payload={**ASK, "stream": True, "stream_options": {"include_usage": True}}) \
        == base
    assert _key(payload={**ASK, "user": "u1", "metadata": {"a": "b"}}) == base
    assert _key(payload=dict(reversed(list(ASK.items())))) == base


@pytest.mark.parametrize("change", [
    {"temperature": 0, "max_tokens": 5}, {"top_p": 0.5}, {"seed": 1}, {"n": 2},
    {"response_format": {"type": "json_object"}}, {"tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "hi!"}]},
])
def test_cache_key_changes_with_what_changes_the_answer(change: dict[str, Any]) -> None:
    """Every field that changes the answer changes the key."""
    assert _key(payload={**ASK, **change}) != _key()


def test_cache_key_scope() -> None:
    """key scope: the client key's name is in the key; shared: it is not; the route always is."""
    assert _key(client="one") != _key(client="two")
    assert _key(client="one", scope=CacheScope.SHARED) == _key(client="two",
                                                               scope=CacheScope.SHARED)
    assert _key(route="chat") != _key(route="other")


@pytest.mark.parametrize(("header", "read", "write"), [
    (None, True, True), ("", True, True), ("no-cache", False, True),
    ("No-Store", False, False), ("max-age=0, no-cache", False, True),
    ("no-cache, no-store", False, False), ("private", True, True),
])
def test_cache_directives(header: str | None, read: bool, write: bool) -> None:
    """Cache-Control: no-store neither reads nor writes; no-cache writes only."""
    directives = cache_directives(header)
    assert (directives.read, directives.write) == (read, write)


def test_freshness_fresh_stale_gone() -> None:
    """Fresh for ttl, stale for stale_if_error after it, then gone."""
    policy = CachePolicy(ttl_s=600.0, stale_if_error_s=3600.0)
    assert freshness(stored_at=1000.0, policy=policy, now=1599.0) is Freshness.FRESH
    assert freshness(stored_at=1000.0, policy=policy, now=1600.0) is Freshness.STALE
    assert freshness(stored_at=1000.0, policy=policy, now=5200.0) is Freshness.GONE


ANSWER = {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}]}


@pytest.mark.parametrize(("kwargs", "storable"), [
    ({}, True),
    ({"status": 500}, False),
    ({"answer": None}, False),
    ({"as_asked": False}, False),
    ({"answer": {"choices": []}}, False),
    ({"answer": {"choices": [{"finish_reason": "content_filter"}]}}, False),
    ({"answer": {"choices": [{"finish_reason": None}]}}, False),
    ({"answer": {"choices": [{"finish_reason": "length"}]}}, True),
])
def test_is_storable(kwargs: dict[str, Any], storable: bool) -> None:
    """Only whole 200 answers produced for the request as sent are stored."""
    given: dict[str, Any] = {"status": 200, "answer": ANSWER, "as_asked": True, **kwargs}
    assert is_storable(**given) is storable


def test_config_cache_section_and_route_keys() -> None:
    """The issue's YAML parses as written; a bare YAML off is the mode off."""
    config = parse_config("""
upstreams: [{name: a, url: http://127.0.0.1:1}]
cache:
  ttl: 10m
  memory: {max_bytes: 256MiB}
  redis: {url: redis://127.0.0.1:6379/0}
  approximate: {threshold: 0.9}
routes:
  - {model: chat, targets: [a], cache: exact, cache_scope: key}
  - {model: other, targets: [a], cache: off}
  - {model: third, targets: [a], cache: always, cache_scope: shared}
""", env={})
    assert config.cache.ttl_s == 600.0
    assert config.cache.memory.max_bytes == 256 * 1024 * 1024
    assert config.cache.redis is not None and config.cache.redis.timeout_s == 0.005
    assert [(r.cache, r.cache_scope) for r in config.routes] == [
        (CacheMode.EXACT, CacheScope.KEY), (CacheMode.OFF, CacheScope.KEY),
        (CacheMode.ALWAYS, CacheScope.SHARED)]


@pytest.mark.parametrize(("text", "message"), [
    ("cache: {redis: {url: http://x}}", "must start with redis://"),
    ("cache: {ttl: soon}", "not a duration"),
    ("cache: {memory: {max_bytes: lots}}", "not a size"),
])
def test_config_cache_section_refused(text: str, message: str) -> None:
    """A bad cache setting is refused, saying how to write it."""
    with pytest.raises(Exception, match=message):
        parse_config(f"upstreams: [{{name: a, url: http://127.0.0.1:1}}]\n{text}\n", env={})
