"""Tests for routing._pool: model-server metrics parsing and the endpoint picker."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from skyroute.routing._errors import RoutingStateError
from skyroute.routing._pool import (
    EndpointPicker,
    EndpointView,
    PickWeights,
    PoolMetricNames,
    ServerLoad,
    parse_server_load,
)

from .fakes import FakeClock

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 1.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="qwen"} 0.5
# HELP vllm:gpu_cache_usage_perc Deprecated name.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="qwen"} 0.99
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="qwen"} 12345.0
"""

OLD_VLLM_TEXT = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.7
"""

SGLANG_TEXT = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 3.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.42
"""

OLLAMA_LIKE_TEXT = """\
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.5
# TYPE go_goroutines gauge
go_goroutines 12
"""

PARSE_CASES = {
    "vllm_new_name_wins_sums_counts_max_kv": (
        VLLM_TEXT,
        ServerLoad(waiting=1, running=5, kv_cache_usage=0.5),
    ),
    "vllm_old_kv_name_fallback": (
        OLD_VLLM_TEXT,
        ServerLoad(waiting=2, running=4, kv_cache_usage=0.7),
    ),
    "sglang": (SGLANG_TEXT, ServerLoad(waiting=3, running=7, kv_cache_usage=0.42)),
    "no_model_server_metrics": (OLLAMA_LIKE_TEXT, None),
    "empty_body": ("", None),
    "only_waiting": (
        "vllm:num_requests_waiting 2\n",
        ServerLoad(waiting=2, running=0, kv_cache_usage=None),
    ),
    "nan_ignored": ("vllm:num_requests_waiting NaN\n", None),
    "only_wanted_lines_parsed": (
        'vllm:e2e_request_latency_seconds_bucket{le="0.5"} 3\n'
        "some other exposition line that is { not prometheus\n"
        "  vllm:num_requests_waiting 2\n",
        ServerLoad(waiting=2, running=0, kv_cache_usage=None),
    ),
    "kv_clamped": (
        "sglang:token_usage 1.7\n",
        ServerLoad(waiting=0, running=0, kv_cache_usage=1.0),
    ),
}


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES.values(), ids=PARSE_CASES.keys())
def test_parse_server_load(text: str, expected: ServerLoad | None) -> None:
    """Load is read from vLLM or SGLang metrics, summed over labels, None without any."""
    assert parse_server_load(text) == expected


def test_parse_server_load_custom_names() -> None:
    """Custom metric names let other servers report their load."""
    names = PoolMetricNames(waiting=("q_len",), running=("busy",), kv_cache_usage=())
    assert parse_server_load("q_len 4\nbusy 1\n", names) == ServerLoad(
        waiting=4, running=1, kv_cache_usage=None
    )


def test_parse_server_load_rejects_garbage() -> None:
    """Text that is not Prometheus exposition raises ValueError."""
    with pytest.raises(ValueError):
        parse_server_load("vllm:num_requests_waiting{ oops\n")


def _load(waiting: int = 0, running: int = 0, kv: float | None = 0.0) -> ServerLoad:
    return ServerLoad(waiting=waiting, running=running, kv_cache_usage=kv)


PICK_CASES = {
    # loads per endpoint a, b, c -> endpoint expected
    "prefers_empty_queue_over_low_kv": (
        {"a": _load(waiting=2, kv=0.1), "b": _load(waiting=0, kv=0.6), "c": _load(waiting=1)},
        "b",
    ),
    "then_low_kv_cache": (
        {
            "a": _load(kv=0.9, running=3),
            "b": _load(kv=0.2, running=4),
            "c": _load(kv=0.5, running=4),
        },
        "b",
    ),
    "then_fewest_running": (
        {"a": _load(running=6), "b": _load(running=3), "c": _load(running=9)},
        "b",
    ),
}


@pytest.mark.parametrize(("loads", "expected"), PICK_CASES.values(), ids=PICK_CASES.keys())
def test_EndpointPicker_pick_by_load(loads: dict[str, ServerLoad], expected: str) -> None:
    """The picker prefers an empty queue, then little KV cache in use, then few running."""
    clock = FakeClock()
    picker = EndpointPicker(["a", "b", "c"])
    for name, load in loads.items():
        picker.on_load(name, load, now=clock.now())
    assert picker.pick(now=clock.now()) == expected


def test_EndpointPicker_round_robin_on_ties() -> None:
    """Equal endpoints are taken in turn, starting after the last one picked."""
    picker = EndpointPicker(["a", "b", "c"])
    assert [picker.pick(now=0.0) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_EndpointPicker_round_robin_among_tied_subset() -> None:
    """When only some endpoints tie for best, they alternate evenly."""
    clock = FakeClock()
    picker = EndpointPicker(["a", "b", "c"])
    for name, waiting in (("a", 0), ("b", 5), ("c", 0)):
        picker.on_load(name, _load(waiting=waiting), now=clock.now())
    picks = [picker.pick(now=clock.now()) for _ in range(6)]
    assert picks == ["a", "c", "a", "c", "a", "c"]


def test_EndpointPicker_without_metrics_uses_in_flight() -> None:
    """With no metrics, the endpoint with the fewest of skyroute's requests wins."""
    picker = EndpointPicker(["a", "b", "c"])
    for name, n in (("a", 2), ("b", 1), ("c", 3)):
        for _ in range(n):
            picker.on_request_start(name)
    assert picker.pick(now=0.0) == "b"
    picker.on_request_start("b")
    picker.on_request_start("b")
    picker.on_request_end("a")
    assert picker.pick(now=0.0) == "a"


def test_EndpointPicker_stale_metrics_ignored() -> None:
    """A load older than stale_after_s no longer counts; in-flight counts decide."""
    clock = FakeClock()
    picker = EndpointPicker(["a", "b"], stale_after_s=10.0)
    picker.on_load("a", _load(waiting=9), now=clock.now())
    picker.on_request_start("b")
    assert picker.pick(now=clock.now()) == "b"
    clock.advance(10.0)
    assert picker.pick(now=clock.now()) == "a"


def test_EndpointPicker_spreads_between_scrapes() -> None:
    """Requests sent since the last scrape count as running, so picks do not herd."""
    clock = FakeClock()
    picker = EndpointPicker(["a", "b"])
    picker.on_load("a", _load(running=2), now=clock.now())
    picker.on_load("b", _load(running=4), now=clock.now())
    chosen = []
    for _ in range(6):
        name = picker.pick(now=clock.now())
        picker.on_request_start(name)
        chosen.append(name)
    assert Counter(chosen) == {"a": 4, "b": 2}
    picker.on_load("a", _load(running=0), now=clock.now())
    assert picker.pick(now=clock.now()) == "a"


def test_EndpointPicker_drops_unhealthy() -> None:
    """An endpoint failing fail_threshold checks in a row is skipped until a check passes."""
    clock = FakeClock()
    picker = EndpointPicker(["a", "b"], fail_threshold=2)
    picker.on_request_start("b")
    picker.on_health("a", False, now=clock.now())
    assert picker.pick(now=clock.now()) == "a"
    picker.on_health("a", False, now=clock.now())
    assert [picker.pick(now=clock.now()) for _ in range(3)] == ["b", "b", "b"]
    picker.on_health("a", True, now=clock.now())
    assert picker.pick(now=clock.now()) == "a"


def test_EndpointPicker_all_unhealthy_picks_least_bad() -> None:
    """With every endpoint down, pick still answers: the one with the fewest failed checks."""
    picker = EndpointPicker(["a", "b", "c"], fail_threshold=1)
    for name, failures in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(failures):
            picker.on_health(name, False, now=0.0)
    assert picker.pick(now=0.0) == "b"


def test_EndpointPicker_custom_weights() -> None:
    """Weights change the ranking: with only running counted, the queue is ignored."""
    clock = FakeClock()
    picker = EndpointPicker(["a", "b"], weights=PickWeights(waiting=0.0, kv_cache=0.0))
    picker.on_load("a", _load(waiting=50, running=1), now=clock.now())
    picker.on_load("b", _load(waiting=0, running=5), now=clock.now())
    assert picker.pick(now=clock.now()) == "a"


ILLEGAL_CALLS: dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]] = {
    "health_unknown": ("on_health", ("zz", True), {"now": 0.0}),
    "load_unknown": ("on_load", ("zz", None), {"now": 0.0}),
    "start_unknown": ("on_request_start", ("zz",), {}),
    "end_unknown": ("on_request_end", ("zz",), {}),
    "end_without_start": ("on_request_end", ("a",), {}),
}


@pytest.mark.parametrize(("method", "args", "kwargs"), ILLEGAL_CALLS.values(), ids=ILLEGAL_CALLS)
def test_EndpointPicker_illegal_events(
    method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Unknown endpoints and unmatched request ends raise RoutingStateError, changing nothing."""
    picker = EndpointPicker(["a", "b"])
    before = picker.snapshot(now=0.0)
    with pytest.raises(RoutingStateError, match=method):
        getattr(picker, method)(*args, **kwargs)
    assert picker.snapshot(now=0.0) == before


def test_EndpointPicker_snapshot() -> None:
    """snapshot describes each endpoint in pool order, with the cost pick would use."""
    clock = FakeClock()
    picker = EndpointPicker(["a", "b"], fail_threshold=1, stale_after_s=10.0)
    picker.on_load("a", _load(waiting=1, running=2, kv=0.5), now=clock.now())
    picker.on_request_start("a")
    picker.on_health("b", False, now=clock.now())
    clock.advance(4.0)
    assert picker.snapshot(now=clock.now()) == (
        EndpointView(
            endpoint="a",
            healthy=True,
            failed_checks=0,
            in_flight=1,
            picks=1,
            load=_load(waiting=1, running=2, kv=0.5),
            load_age_s=4.0,
            fresh=True,
            cost=6.0,
        ),
        EndpointView(
            endpoint="b",
            healthy=False,
            failed_checks=1,
            in_flight=0,
            picks=0,
            load=None,
            load_age_s=None,
            fresh=False,
            cost=None,
        ),
    )
    assert repr(picker) == "<EndpointPicker a:up/1 b:down/0>"


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ([], {}, "at least one"),
        (["a", "a"], {}, "duplicate"),
        (["a"], {"stale_after_s": 0.0}, "stale_after_s"),
        (["a"], {"fail_threshold": 0}, "fail_threshold"),
    ],
)
def test_EndpointPicker_rejects_bad_args(
    args: list[str], kwargs: dict[str, Any], match: str
) -> None:
    """A bad pool definition raises ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=match):
        EndpointPicker(args, **kwargs)
