"""A sync-token holder cannot corrupt, bloat or stall the shared state."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, create_update_message
from skyroute.statesync._validate import UpdateRejected, check_value

from .conftest import CALL_TIMEOUT_S, eventually
from .test_statesync_peers import TOKEN, Instance, bound_socket, start_instance


@pytest.fixture
async def instance() -> AsyncIterator[Instance]:
    inst = await start_instance("solo", bound_socket(), [], max_sessions=10)
    yield inst
    await inst.stop()


def _update(doc_maps: dict[str, dict[str, Any]], *, extra_root: bool = False) -> bytes:
    doc: Doc[Any] = Doc()
    for map_name, entries in doc_maps.items():
        ymap = doc.get(map_name, type=Map)
        for key, value in entries.items():
            ymap[key] = value
    if extra_root:
        doc.get("evil", type=Array).append("x" * 100)
    return doc.get_update()


async def _send(inst: Instance, doc: str, update: bytes) -> aiohttp.WSMessage:
    """Send one SYNC_UPDATE as a Yjs client holding the token; the next non-sync frame."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.ws_connect(
            f"ws://127.0.0.1:{inst.port}/sync/{doc}?token={TOKEN}") as ws:
        await ws.send_bytes(create_update_message(update))
        async with asyncio.timeout(CALL_TIMEOUT_S):
            while True:
                frame = await ws.receive()
                if frame.type is not aiohttp.WSMsgType.BINARY:
                    return frame


BAD_UPDATES = {
    "usage bucket as text": ("usage", {"usage": {"w|1|k": {"key": "k", "b": "x", "w": "w"}}},
                             "schema"),
    "infinite count": ("usage", {"usage": {"w|1|k": {"key": "k", "b": 1, "w": "w",
                                                      "r": math.inf}}}, "schema"),
    "nested CRDT type": ("sessions", {"sessions": {"s": Map({"upstream": "a"})}}, "schema"),
    "unknown field": ("sessions", {"sessions": {"s": {"upstream": "a", "evil": 1}}}, "schema"),
    "shares gift as text": ("usage", {"shares": {"w": {"w": "w", "k": {"team": {
        "d": 1, "g": {"other": "lots"}}}}}}, "schema"),
    "value over 16 KiB": ("sessions", {"sessions": {"big": {"attributes": {
        f"{i:03}" + "k" * 253: "v" * 256 for i in range(32)}}}}, "value_size"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
async def test_bad_update_is_dropped_whole_and_the_peer_disconnected(instance, case):
    """An update breaking the schema changes nothing (not even its valid parts), closes the
    connection and is counted; rotation still works afterwards."""
    doc, maps, reason = BAD_UPDATES[case]
    maps = {name: {**entries, "valid-too": {"ts": 1.0} if name == "meta" else
                   {"upstream": "ok"} if name == "sessions" else
                   {"w": "v", "k": {}} if name == "shares" else
                   {"key": "k", "b": 2, "w": "w", "r": 1, "t": 1}}
            for name, entries in maps.items()}
    frame = await _send(instance, doc, _update(maps))
    assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                          aiohttp.WSMsgType.CLOSING)
    hub_maps = instance.sync._hubs[doc].doc.maps
    assert all(key not in hub_maps[name] for name, entries in maps.items() for key in entries)
    assert instance.metric("skyroute_sync_updates_rejected_total", doc=doc, reason=reason) == 1
    epoch = instance.sync.epoch
    await instance.sync.rotate()
    assert instance.sync.epoch == epoch + 1
    assert instance.metric("skyroute_sync_epoch") == epoch + 1


async def test_update_creating_another_root_is_refused(instance):
    """Only the document's own maps may exist: an update adding a root is dropped."""
    await _send(instance, "sessions", _update({"sessions": {"s": {"upstream": "a"}}},
                                              extra_root=True))
    assert instance.metric("skyroute_sync_updates_rejected_total", doc="sessions",
                           reason="unknown_root") == 1
    assert "s" not in instance.sync._hubs["sessions"].doc.maps["sessions"]


async def test_valid_update_from_a_client_is_applied(instance):
    """A well-formed session written by a Yjs client is applied and readable."""
    await _send_and_close(instance, _update({"sessions": {"ext": {"upstream": "u", "created": 5.0,
                                                                   "last_seen": 5.0}}}))
    assert instance.sync._hubs["sessions"].doc.maps["sessions"]["ext"]["upstream"] == "u"


async def _send_and_close(inst: Instance, update: bytes) -> None:
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.ws_connect(
            f"ws://127.0.0.1:{inst.port}/sync/sessions?token={TOKEN}") as ws:
        await ws.send_bytes(create_update_message(update))
        await ws.receive()  # the server's SYNC_STEP1: our update was read before it answered
    await eventually(lambda: "ext" in inst.sync._hubs["sessions"].doc.maps["sessions"])


@pytest.mark.parametrize("query", ["epoch=%C2%B2", "epoch=-1", "epoch=1e3", "epoch=" + "9" * 30,
                                   "instance=" + "x" * 300, "instance=%00"])
async def test_bad_query_parameters_get_400(instance, query):
    """A malformed epoch or instance (even with a valid token) is a 400, not a 500."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(
            f"http://127.0.0.1:{instance.port}/sync/sessions?token={TOKEN}&{query}") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_sessions_over_the_cap_are_evicted_oldest_first(instance):
    """Past max_sessions, the least recently seen sessions go first, counted in a metric."""
    store = instance.sync.store
    for i in range(25):
        store.pin(f"s{i:02}", "a", now=1000.0 + i)
    store.flush()
    sessions = instance.sync._hubs["sessions"].doc.maps["sessions"]
    assert len(sessions) <= 10
    assert "s24" in sessions and "s00" not in sessions
    assert instance.metric("skyroute_sync_sessions_evicted_total") >= 15


@given(st.sampled_from(["sessions", "upstreams", "usage", "meta", "shares"]),
       st.dictionaries(st.text(max_size=6), st.one_of(
           st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=300),
           st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3)), max_size=5))
def test_check_value_accepts_or_rejects_never_crashes(map_name: str, value: dict) -> None:
    """Any JSON-ish value is either accepted or refused with UpdateRejected."""
    try:
        check_value(map_name, "k", value, max_value_bytes=16 * 1024)
    except UpdateRejected as exc:
        assert exc.reason in ("schema", "value_size")
