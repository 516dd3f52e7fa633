"""The model rename: a byte splice exactly when provably right, else a re-encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skyroute.proxy._rename import rename_model

_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=12)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["model", "role", "content", "x", "modèle"]) | st.text(
        max_size=6), inner, max_size=4),
    max_leaves=12)
_payloads = st.builds(
    lambda model, rest: {**rest, "model": model},
    st.text(max_size=20), st.dictionaries(st.text(max_size=8), _json, max_size=5))
_encodings = st.sampled_from([
    {}, {"ensure_ascii": False}, {"separators": (",", ":")}, {"indent": 2},
    {"separators": (" , ", " : "), "ensure_ascii": False}])


@given(payload=_payloads, encoding=_encodings, new=st.text(max_size=20))
@settings(max_examples=150, deadline=None)
def test_rename_model_always_parses_to_the_payload_with_the_new_model(payload, encoding, new):
    """Whatever the body's spelling, the renamed body parses to the payload with only
    ``model`` changed."""
    body = json.dumps(payload, **encoding).encode()
    assert json.loads(rename_model(body, payload, new)) == {**payload, "model": new}


@given(payload=_payloads, new=st.text(max_size=20))
@settings(max_examples=100, deadline=None)
def test_rename_model_keeps_every_other_byte_when_model_is_the_only_model_key(payload, new):
    """With one ``model`` key, the splice keeps the client's bytes around the value."""
    payload = {k: v for k, v in payload.items() if "model" not in json.dumps(v)}
    payload["model"] = payload.get("model", "m")
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    renamed = rename_model(body, payload, new)
    head = body[:body.index(b'"model":') + 8]
    assert renamed.startswith(head)
    assert json.loads(renamed) == {**payload, "model": new}


@pytest.mark.parametrize("body", [
    # A nested "model" key beside the top-level one: two occurrences, re-encoded.
    b'{"tools": [{"model": "chat"}], "model": "chat"}',
    # The top-level key spelt with an escape, a nested one literal: re-encoded.
    b'{"mod\\u0065l": "chat", "metadata": {"model": "chat"}}',
    # The value with escapes.
    b'{"model": "ch\\u0061t", "messages": []}',
    # "model" as a value elsewhere.
    b'{"role": "model", "model": "chat"}',
    # Whitespace everywhere, and a BOM-less UTF-8 body with non-ASCII text.
    '{ "messages" : [ {"content": "héllo \\"model\\""} ] ,\n "model"\t:\t"chat" }'.encode(),
])
def test_rename_model_is_right_on_tricky_bodies(body):
    """Tricky spellings of the key and value still give the right top-level model."""
    payload: dict[str, Any] = json.loads(body)
    renamed = rename_model(body, payload, 'up"stream/\u00e9')
    assert json.loads(renamed) == {**payload, "model": 'up"stream/\u00e9'}


def test_rename_model_splices_a_plain_body_without_re_encoding():
    """A body with one literal ``model`` keeps its non-ASCII bytes and spacing."""
    body = '{"messages": [{"role": "user", "content": "日本語"}],  "model" : "chat"}'.encode()
    renamed = rename_model(body, json.loads(body), "deepseek-chat")
    assert renamed == '{"messages": [{"role": "user", "content": "日本語"}],  "model" : ' \
                      '"deepseek-chat"}'.encode()
