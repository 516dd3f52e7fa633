"""UpstreamHealth: admission (panic included), soundness, and when outside reports are old."""

from __future__ import annotations

from skyroute.routing import (
    AttemptOutcome,
    Result,
    Target,
    UpstreamHealth,
    UpstreamState,
    parse_config,
)

from .fakes import FakeClock

CONFIG = parse_config("""\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
""", env={})


def _health() -> UpstreamHealth:
    return UpstreamHealth("a", breaker=CONFIG.breaker, latency=CONFIG.latency,
                          retry=CONFIG.retry, threshold_s=0.2)


def _outcome(result: Result) -> AttemptOutcome:
    target = Target(upstream=CONFIG.upstream("a"), endpoint="http://a/v1", model="m-a")
    return AttemptOutcome(target=target, result=result, ttfb_s=0.05)


def test_UpstreamHealth_bad_key_admits_only_a_panic_try_whose_answer_clears_it():
    """A bad key keeps requests away, but the panic rule may still try it; an answer ends it."""
    clock = FakeClock()
    health = _health()
    health.record(_outcome(Result.BAD_KEY), now=clock.now())
    assert health.state(now=clock.now()) == "bad_key"
    assert not health.admit(now=clock.now()) and not health.is_sound(now=clock.now())
    assert health.admit(now=clock.now(), panic=True)
    health.record(_outcome(Result.SUCCESS), now=clock.now())
    assert health.state(now=clock.now()) == "healthy" and health.is_sound(now=clock.now())


def test_UpstreamHealth_half_open_is_available_but_not_sound():
    """After the cool-down a probe may go, but a retry there is not free failover."""
    clock = FakeClock()
    health = _health()
    for _ in range(5):
        health.record(_outcome(Result.SERVER_ERROR), now=clock.now())
    clock.advance(5.0)
    assert health.is_available(now=clock.now())
    assert not health.is_sound(now=clock.now())


def test_UpstreamHealth_a_report_older_than_its_last_answer_is_out_of_date():
    """A peer's bad_key report counts until the upstream answers here after it."""
    clock = FakeClock()
    health = _health()
    health.record(_outcome(Result.SUCCESS), now=clock.now())
    clock.advance(1.0)
    health.mark(UpstreamState.BAD_KEY, until=clock.now() + 600.0, reason="peer", now=clock.now())
    assert not health.is_answering()  # the report is newer than the last answer
    clock.advance(1.0)
    assert health.admit(now=clock.now(), panic=True)
    health.record(_outcome(Result.SUCCESS), now=clock.now())
    assert health.is_answering()
    clock.advance(1.0)
    health.record(_outcome(Result.SERVER_ERROR), now=clock.now())
    assert not health.is_answering()
