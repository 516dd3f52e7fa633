"""Redaction: key-shaped strings and every configured secret are replaced in log values."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from skyroute.proxy._redact import REDACTED, redact, redact_processor, register_secrets

CASES = [
    ("Incorrect API key provided: sk-UPSTREAM-SECRET-456", "sk-UPSTREAM-SECRET-456"),
    ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
    ("bearer xyz123", "xyz123"),
    ("http://user:pw123@host/v1", "pw123"),
    ("GET /sync/sessions?token=s3cr3t&epoch=1", "s3cr3t"),
    ("key AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
    ("jwt eyJhbGciOiJIUzI1.eyJzdWIiOiIx.c2lnbmF0dXJl", "eyJzdWIiOiIx"),
]


@pytest.mark.parametrize(("text", "secret"), CASES)
def test_redact_replaces_key_shaped_strings(text: str, secret: str) -> None:
    """Bearer tokens, sk- keys, URL passwords, token= values, random tokens and JWTs go."""
    out = redact(text)
    assert secret not in out and REDACTED in out


def test_redact_keeps_ordinary_text_and_request_ids() -> None:
    """Words, model names, paths and lower-case hex request ids stay readable."""
    text = "request 0123456789abcdef0123456789abcdef to deepseek-chat via /v1/chat/completions"
    assert redact(text) == text


def test_redact_processor_redacts_nested_values_and_exceptions() -> None:
    """Values inside dicts and lists, and exception texts, are redacted too."""
    event = {"event": "x", "detail": {"why": ["Bearer tok123"]},
             "error": ValueError("sk-abcdefgh1234 rejected"), "n": 3}
    out = redact_processor(None, "info", event)
    assert "tok123" not in str(out) and "sk-abcdefgh1234" not in str(out) and out["n"] == 3


@given(st.text(min_size=6, max_size=30).filter(lambda s: s.strip() == s and len(s) >= 6),
       st.text(max_size=40), st.text(max_size=40))
def test_a_registered_secret_never_survives(secret: str, before: str, after: str) -> None:
    """Whatever surrounds a configured secret, redaction removes it."""
    register_secrets([secret])
    assert secret not in redact(before + secret + after)


def test_many_registered_secrets_each_replaced_inside_longer_text() -> None:
    """With thousands of secrets registered, each is found inside query strings, JSON and
    URLs, and a secret that contains another is replaced whole."""
    many = [f"ck-{i:05d}-Zq{i * 7919 % 100_003:06d}" for i in range(5000)]
    register_secrets([*many, "outer-SECRET-inner-tail", "SECRET-inner"])
    for secret in (many[0], many[2500], many[-1]):
        for text in (f"key={secret}&x=1", f'{{"k": "{secret}"}}', f"https://h/{secret}/v1",
                     f"xx{secret}yy"):
            out = redact(text)
            assert secret not in out and REDACTED in out, text
    assert redact("a outer-SECRET-inner-tail b") == f"a {REDACTED} b"
    assert redact("a SECRET-inner b") == f"a {REDACTED} b"


@given(key=st.sampled_from(["path", "method", "request_id", "cut", "upstream_request_id",
                            "endpoint", "route"]),
       before=st.text(max_size=20), after=st.text(max_size=20),
       case=st.sampled_from(CASES))
def test_every_field_but_skyroutes_own_is_searched(key: str, before: str, after: str,
                                                   case: tuple[str, str]) -> None:
    """Whatever field a client's or upstream's text lands in, key-shaped text in it goes
    (the fast path checks all string fields at once, then redacts field by field)."""
    assume(case[1] not in before + after)
    event = {"event": "request_finished", "level": "info", "status": 200,
             "timestamp": "2026-01-02T03:04:05.678901Z", key: f"{before} {case[0]} {after}"}
    out = redact_processor(None, "info", dict(event))
    assert out[key] == redact(event[key]) and case[1] not in out[key]


def test_fields_skyroute_writes_itself_are_left_as_written() -> None:
    """The event name, level and timestamp cannot hold a secret: a registered secret that
    happens to look like part of one does not garble it; the same text elsewhere goes."""
    register_secrets(["678901Z", "finished_Qx7"])
    event = {"event": "request_finished_Qx7", "level": "info",
             "timestamp": "2026-01-02T03:04:05.678901Z", "path": "/v1/678901Z"}
    out = redact_processor(None, "info", dict(event))
    assert out["timestamp"] == event["timestamp"] and out["event"] == event["event"]
    assert out["path"] == f"/v1/{REDACTED}"
