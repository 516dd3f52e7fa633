"""Redaction: key-shaped strings and every configured secret are replaced in log values."""

from __future__ import annotations

import pytest
from hypothesis import given
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
