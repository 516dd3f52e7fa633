"""routing._jobs: what follows a job's try, the lane's AIMD window, batch lines and statuses."""

from __future__ import annotations

import json
import random

import pytest
from skyroute.routing import (
    BatchLine,
    BatchStatus,
    Finished,
    GaveUp,
    GiveUp,
    JobsLane,
    JobsPolicy,
    JobsRedis,
    LaneProcess,
    LaneShare,
    LaneWindow,
    LineProblem,
    RetryLater,
    Router,
    RoutingStateError,
    UpstreamState,
    after_try,
    job_target_order,
    next_batch_status,
    parse_config,
    read_batch_line,
)

POLICY = {"max_retries": 3, "base_s": 1.0, "cap_s": 8.0}

AFTER_TRY_CASES = [
    # (status, retries_done, retry_after_s, expected kind)
    (200, 0, None, Finished),
    (400, 0, None, Finished),  # the request's own fault: never retried
    (404, 2, None, Finished),
    (422, 0, None, Finished),
    (503, 0, None, RetryLater),
    (429, 1, 5.0, RetryLater),
    (None, 2, None, RetryLater),  # no answer at all
    (500, 3, None, GaveUp),  # max_retries 3: the fourth try was the last
    (None, 3, None, GaveUp),
]


@pytest.mark.parametrize(("status", "retries_done", "retry_after", "kind"), AFTER_TRY_CASES)
def test_after_try_decides_by_status_and_retries_left(status, retries_done, retry_after, kind):
    """2xx and plain 4xx finish, busy answers retry until max_retries, then give up."""
    decision = after_try(status, error="HTTP x", retries_done=retries_done,
                         rng=random.Random(1), retry_after_s=retry_after, **POLICY)
    assert isinstance(decision, kind)


def test_after_try_delay_is_full_jitter_under_the_capped_ceiling():
    """Retry n waits uniform(0, min(cap, base * 2**n)); never above the ceiling."""
    rng = random.Random(7)
    for retries_done, ceiling in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)):
        delays = [after_try(503, error="", retries_done=retries_done, rng=rng, max_retries=10,
                            base_s=1.0, cap_s=8.0).delay_s for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > ceiling / 2  # spread over the range, not stuck low


def test_after_try_waits_at_least_the_retry_after():
    """An upstream's Retry-After longer than the backoff is honoured."""
    decision = after_try(429, error="", retries_done=0, rng=random.Random(1),
                         retry_after_s=30.0, **POLICY)
    assert isinstance(decision, RetryLater) and decision.delay_s == 30.0


def test_after_try_gave_up_names_the_tries_and_the_setting():
    """The error kept for the error file says how many tries and which setting stopped them."""
    decision = after_try(503, error="HTTP 503: busy", retries_done=3, rng=random.Random(1),
                         **POLICY)
    assert isinstance(decision, GaveUp)
    assert decision.error == "HTTP 503: busy (after 4 tries; jobs.max_retries is 3)"


def test_LaneWindow_halves_on_busy_once_per_cooldown_and_grows_back():
    """AIMD: a busy burst halves once per cooldown, down to 1; successes add ~1 per window."""
    lane = LaneWindow(16, cooldown_s=1.0)
    assert lane.on_busy(now=10.0) and lane.size == 8
    assert not lane.on_busy(now=10.5) and lane.size == 8  # the same burst
    for t in (11.0, 12.0, 13.0, 14.0, 15.0):
        lane.on_busy(now=t)
    assert lane.size == 1
    for _ in range(3):
        lane.on_success()
    assert lane.size >= 2
    for _ in range(1000):
        lane.on_success()
    assert lane.size == 16
    assert repr(lane) == "<LaneWindow 16/16>"


def test_LaneShare_gives_the_whole_window_without_clients_and_yields_to_them():
    """No clients: the whole window. Clients: from 0, +1 a tick under the CPU target and
    lag limit, halved a tick over either; the window still bounds it."""
    share = LaneShare(cpu_target=0.5, lag_limit_s=0.005, trickle_s=1.0, quiet_ticks=3)
    assert share.room(window=16, running=3, now=0.0) == 13
    share.tick(clients=0, cpu=0.9, lag_s=0.0, window=16)  # the lane alone may use it all
    assert share.share is None and share.room(window=16, running=0, now=0.0) == 16
    share.tick(clients=2, cpu=0.9, lag_s=0.0, window=16)  # clients arrive: stop at once
    assert share.share == 0
    for _ in range(6):
        share.tick(clients=1, cpu=0.2, lag_s=0.001, window=16)
    assert share.share == 6 and share.room(window=16, running=4, now=0.0) == 2
    share.tick(clients=1, cpu=0.7, lag_s=0.001, window=16)  # over the CPU target
    assert share.share == 3
    share.tick(clients=1, cpu=0.2, lag_s=0.02, window=16)  # the loop lags
    assert share.share == 1
    share.tick(clients=1, cpu=0.2, lag_s=0.0, window=1)  # the AIMD window is smaller
    assert share.share == 1 and share.room(window=1, running=1, now=0.0) == 0
    for _ in range(2):  # a pause shorter than quiet_ticks: still sharing, growing
        share.tick(clients=0, cpu=0.2, lag_s=0.0, window=16)
    assert share.share == 3
    share.tick(clients=1, cpu=0.2, lag_s=0.0, window=16)  # a client polling now and then
    assert share.share == 4
    for _ in range(3):
        share.tick(clients=0, cpu=0.2, lag_s=0.0, window=16)
    assert share.share is None and repr(share) == "<LaneShare all>"


def test_LaneShare_at_zero_trickles_one_job_a_second_when_none_runs():
    """A saturated instance slows the lane to a trickle; it never stops it."""
    share = LaneShare(cpu_target=0.5, trickle_s=1.0)
    share.tick(clients=5, cpu=1.0, lag_s=0.05, window=16)
    assert share.share == 0
    assert share.room(window=16, running=0, now=100.0) == 1
    assert share.room(window=16, running=0, now=100.5) == 0  # not yet a second later
    assert share.room(window=16, running=1, now=101.5) <= 0  # one still runs
    assert share.room(window=16, running=0, now=101.5) == 1
    with pytest.raises(ValueError, match="cpu_target"):
        LaneShare(cpu_target=0.0)


def test_LaneWindow_set_limit_shrinks_the_window():
    lane = LaneWindow(16)
    lane.set_limit(4)
    assert lane.size == 4 and lane.limit == 4


def line(**item: object) -> bytes:
    base: dict[str, object] = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "m"}}
    base.update(item)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


LINE_CASES = [
    (line(), None),
    (b"{nope", "invalid_json_line"),
    (b"[1]", "invalid_json_line"),
    (line(custom_id=None), "missing_required_parameter"),
    (line(custom_id=""), "missing_required_parameter"),
    (line(method="GET"), "invalid_request"),
    (line(url="/v1/embeddings"), "mismatched_endpoint"),
    (line(body="text"), "invalid_request"),
    (line(body={"model": "m", "stream": True}), "invalid_request"),
]


@pytest.mark.parametrize(("raw", "code"), LINE_CASES)
def test_read_batch_line_checks_each_rule(raw, code):
    """Each OpenAI batch-line rule broken gives its code; a good line gives its body."""
    checked = read_batch_line(raw, line=3, endpoint="/v1/chat/completions")
    if code is None:
        assert isinstance(checked, BatchLine)
        assert (checked.line, checked.custom_id, json.loads(checked.body)) == (3, "a",
                                                                              {"model": "m"})
    else:
        assert isinstance(checked, LineProblem) and checked.code == code
        assert checked.message.startswith("line 3")


def test_next_batch_status_follows_the_table_and_refuses_the_rest():
    """validating -> in_progress -> finalizing -> completed; a completed batch moves no more."""
    s = BatchStatus
    assert next_batch_status(s.VALIDATING, s.IN_PROGRESS) is s.IN_PROGRESS
    assert next_batch_status(s.CANCELLING, s.CANCELLED) is s.CANCELLED
    with pytest.raises(RoutingStateError, match="completed to in_progress"):
        next_batch_status(s.COMPLETED, s.IN_PROGRESS)
    assert {x for x in s if x.is_terminal} == {s.COMPLETED, s.FAILED, s.EXPIRED, s.CANCELLED}


@pytest.mark.parametrize(("hosts", "target", "allowed"), [
    ((), "93.184.215.14", False),  # the default: no webhooks at all
    (("*",), "93.184.215.14", True),
    (("*",), "10.0.0.5", False),
    (("*.example.com",), "hooks.example.com", True),
    (("*.example.com",), "example.org", False),
    (("10.0.0.0/8",), "10.1.2.3", True),
    (("10.0.0.0/8",), "192.168.1.1", False),
    (("127.0.0.1",), "::ffff:127.0.0.1", True),
    (("*",), "::ffff:127.0.0.1", False),
    (("*",), "fe80::1", False),
])
def test_webhook_hosts_allow_names_public_addresses_and_listed_ranges(hosts, target, allowed):
    assert JobsPolicy(webhook_hosts=hosts).webhook_host_allowed(target) is allowed


def test_webhook_hosts_entry_that_is_neither_name_nor_address_is_refused():
    with pytest.raises(ValueError, match="webhook_hosts entry 'http://x'"):
        JobsPolicy(webhook_hosts=("http://x",))


JOB_TARGETS = """\
upstreams:
  - {name: cloud, url: "http://cloud/v1", models: {chat: gpt}}
  - {name: backup, url: "http://backup/v1", models: {chat: gpt}}
  - {name: gpu, endpoints: ["http://g1/v1", "http://g2/v1"], models: {chat: llama}}
  - {name: cheap, url: "http://cheap/v1", models: {chat: mini}}
routes:
  - {model: chat, targets: [cloud, backup], strategy: weighted}
jobs:
  targets:
    chat: [gpu, cheap]
"""


@pytest.mark.parametrize(("available", "order", "expected"), [
    ({"gpu", "cheap", "a", "b"}, ["a", "b"], ["gpu", "cheap", "a", "b"]),
    ({"cheap", "a", "b"}, ["a", "b"], ["cheap", "a", "b", "gpu"]),  # gpu out: last (panic)
    ({"a", "b"}, ["a", "b"], ["a", "b", "gpu", "cheap"]),  # all preferred out: the route's
    ({"gpu", "a"}, ["b", "a"], ["gpu", "b", "a", "cheap"]),  # the route's order is kept
])
def test_job_target_order(available, order, expected):
    """Preferred upstreams available now first, as written; then the route's own order."""
    assert job_target_order(("gpu", "cheap"), order, available=available.__contains__) == expected


def test_job_target_order_keeps_a_preferred_target_that_is_also_the_routes_in_front():
    assert job_target_order(("b",), ["a", "b"], available=lambda _: True) == ["b", "a"]
    assert job_target_order(("b",), ["a", "b"], available=lambda n: n != "b") == ["a", "b"]


def test_router_sends_jobs_to_jobs_targets_and_interactive_requests_to_the_routes():
    """A job's plan starts with jobs.targets (with that upstream's own model name); a plain
    request's plan never includes them."""
    router = Router(parse_config(JOB_TARGETS, env={}), rng=random.Random(1))
    route = router.route_for("chat")
    assert route is not None
    job = router.plan(route, now=0.0, job=True)
    first = job.next_attempt(now=0.0)
    assert not isinstance(first, GiveUp)
    assert (first.name, first.model) == ("gpu", "llama")  # type: ignore[union-attr]
    for _ in range(20):
        plain = router.plan(route, now=0.0).next_attempt(now=0.0)
        assert plain.name in ("cloud", "backup")  # type: ignore[union-attr]
    assert router.job_targets("chat") == ("gpu", "cheap")
    assert router.job_targets("embed") == ()


def test_router_jobs_fall_back_to_the_next_preferred_then_to_the_routes_targets():
    router = Router(parse_config(JOB_TARGETS, env={}), rng=random.Random(1))
    route = router.route_for("chat")
    assert route is not None
    router.mark("gpu", UpstreamState.DOWN, until=100.0, reason="test", now=0.0)
    first = router.plan(route, now=1.0, job=True).next_attempt(now=1.0)
    assert first.name == "cheap"  # type: ignore[union-attr]
    router.mark("cheap", UpstreamState.DOWN, until=100.0, reason="test", now=0.0)
    first = router.plan(route, now=1.0, job=True).next_attempt(now=1.0)
    assert first.name in ("cloud", "backup")  # type: ignore[union-attr]
    back = router.plan(route, now=200.0, job=True).next_attempt(now=200.0)
    assert back.name == "gpu"  # type: ignore[union-attr]


@pytest.mark.parametrize(("lane", "redis", "process"), [
    ({}, None, LaneProcess.INLINE),  # SQLite: its write lock is shared with serving workers
    ({}, JobsRedis(url="redis://127.0.0.1:6379/0"), LaneProcess.SEPARATE),
    ({"process": "separate"}, None, LaneProcess.SEPARATE),
    ({"process": "inline"}, JobsRedis(url="redis://127.0.0.1:6379/0"), LaneProcess.INLINE),
])
def test_lane_process_auto_is_separate_with_redis_and_inline_with_sqlite(
        lane: dict[str, str], redis: JobsRedis | None, process: LaneProcess) -> None:
    assert JobsPolicy(lane=JobsLane(**lane), redis=redis).lane_process is process
