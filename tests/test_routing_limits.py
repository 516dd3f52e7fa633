"""Client rate limits as a sliding window: who is admitted, and a Retry-After that holds."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from skyroute.routing import RATE_WINDOW_S, Admit, Limit, LimitStatus, RateLimited, check_rate

from .fakes import FakeClock


@dataclass(frozen=True)
class Slice:
    """Counts of one 1 s usage bucket, as statesync's ``UsageBucket`` carries them."""

    start: float
    requests: int = 0
    tokens: int = 0

    @property
    def end(self) -> float:
        return self.start + 1.0


class Window:
    """What a store would hold: requests and tokens counted at the times they happened."""

    def __init__(self) -> None:
        self.slices: list[Slice] = []

    def count(self, at: float, *, requests: int = 0, tokens: int = 0) -> None:
        self.slices.append(Slice(start=float(int(at)), requests=requests, tokens=tokens))

    def check(self, now: float, *, rpm: int | None = None,
              tpm: int | None = None) -> Admit | RateLimited:
        return check_rate(key="team", rpm=rpm, tpm=tpm, usage=self.slices, now=now)


# (what was counted: (at, requests, tokens)..., limits, when asked, retry_after_s or None)
CASES = [
    # Three requests at once use rpm 3 up; the bucket that holds them ([100, 101)) counts
    # until 161, so 61 s (the old 10 s buckets said "4", and were refused again).
    ([(100.2, 1, 0)] * 3, {"rpm": 3}, 100.5, 61),
    ([(100.2, 1, 0)] * 3, {"rpm": 3}, 160.2, 1),
    ([(100.2, 1, 0)] * 3, {"rpm": 3}, 161.0, None),
    ([(100.2, 1, 0)] * 2, {"rpm": 3}, 100.5, None),
    # Spread out: only the oldest has to leave.
    ([(100.0, 1, 0), (120.0, 1, 0), (140.0, 1, 0)], {"rpm": 3}, 150.0, 11),
    # Five counted, limit 3: the two oldest buckets must both leave.
    ([(100.0, 2, 0), (110.0, 1, 0), (130.0, 2, 0)], {"rpm": 3}, 131.0, 40),
    # Tokens: 1100 counted against 1000; once the 500 leave, 600 are under the limit.
    ([(100.0, 1, 500), (130.0, 1, 600)], {"tpm": 1000}, 131.0, 30),
    ([(100.0, 1, 500), (130.0, 1, 600)], {"tpm": 1000}, 161.0, None),
    # A correction (negative tokens) counts in its own bucket: 1100 are counted, and once
    # the 900 leave (at 161) 200 are.
    ([(100.0, 1, 900), (101.0, 0, -400), (102.0, 0, 600)], {"tpm": 1000}, 103.0, 58),
    # Both limits reached: the later of the two.
    ([(100.0, 2, 100), (140.0, 1, 1000)], {"rpm": 3, "tpm": 1000}, 141.0, 60),
]


@pytest.mark.parametrize(("counted", "limits", "now", "retry_after_s"), CASES)
def test_check_rate_admits_under_the_limits_and_says_when_otherwise(counted, limits, now,
                                                                     retry_after_s):
    """A request is admitted under rpm and tpm; a refusal's Retry-After is when enough of
    the oldest counts have left the 60 s window, in whole seconds."""
    window = Window()
    for at, requests, tokens in counted:
        window.count(at, requests=requests, tokens=tokens)
    decision = window.check(now, **limits)
    if retry_after_s is None:
        assert isinstance(decision, Admit)
    else:
        assert isinstance(decision, RateLimited)
        assert decision.retry_after_s == retry_after_s
        assert decision.remaining == 0


def test_RateLimited_message_says_the_retry_after_it_carries():
    """The header (retry_after_s) and the message say the same number, with the limit."""
    window = Window()
    for _ in range(3):
        window.count(100.2, requests=1)
    decision = window.check(100.5, rpm=3)
    assert isinstance(decision, RateLimited)
    assert (decision.limit, decision.allowed, decision.used) == (Limit.REQUESTS, 3, 3)
    assert decision.message == (
        "rate limit for key 'team': 3 requests per minute across all skyroute instances, "
        "and 3 were counted in the last minute; retry after 61s")
    tokens = Window()
    tokens.count(100.0, tokens=1200)
    refused = tokens.check(100.5, tpm=1000)
    assert isinstance(refused, RateLimited) and refused.limit is Limit.TOKENS
    assert refused.message.startswith("token limit for key 'team': 1000 tokens per minute")
    assert refused.message.endswith(f"retry after {refused.retry_after_s}s")


def test_a_client_that_waits_retry_after_is_admitted():
    """Scripted clients send at random under rpm 5; each refused one waits exactly as told
    and is admitted then, never refused twice in a row (a fake clock, a thousand steps)."""
    rng = random.Random(11)
    clock = FakeClock(start=1000.0)
    window = Window()
    waiting_until: float | None = None
    admitted = refused = 0
    for _ in range(1000):
        clock.advance(rng.choice([0.0, 0.1, 0.7, 3.0, 9.5]))
        if waiting_until is not None and clock.now() < waiting_until:
            continue  # this client is waiting as told; it sends nothing meanwhile
        decision = window.check(clock.now(), rpm=5)
        if isinstance(decision, RateLimited):
            assert waiting_until is None, "refused again after waiting Retry-After"
            refused += 1
            waiting_until = clock.now() + decision.retry_after_s
            continue
        waiting_until = None
        window.count(clock.now(), requests=1)
        admitted += 1
    assert admitted > 100 and refused > 10


def test_an_admitted_request_says_where_each_limit_stands():
    """Admitted, the key learns what is left of each limit with this request counted, and
    when the oldest count leaves the window (OpenAI's x-ratelimit-* headers)."""
    window = Window()
    window.count(100.2, requests=2, tokens=300)
    decision = window.check(100.5, rpm=3, tpm=1000)
    assert isinstance(decision, Admit)
    assert decision.status == (
        LimitStatus(limit=Limit.REQUESTS, allowed=3, remaining=0, reset_s=60.5),
        LimitStatus(limit=Limit.TOKENS, allowed=1000, remaining=700, reset_s=60.5))
    assert window.check(100.5).status == ()  # a key without limits has nothing to say


def test_check_rate_never_counts_more_than_the_window_plus_a_bucket():
    """A request counts for 60 s and never more than 61 s (1 s buckets)."""
    window = Window()
    window.count(100.9, requests=1)
    assert isinstance(window.check(100.9 + RATE_WINDOW_S - 0.1, rpm=1), RateLimited)
    assert isinstance(window.check(101.0 + RATE_WINDOW_S, rpm=1), Admit)
