"""Client rate limits as a sliding window: who is admitted, and a Retry-After that holds."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from skyroute.routing import (
    RATE_WINDOW_S,
    Admit,
    Gift,
    Limit,
    LimitShares,
    LimitStatus,
    PeerShares,
    RateLimited,
    base_shares,
    check_rate,
    check_share,
    fair_targets,
    live_limit,
)

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


# -- shares of an rpm across instances (routing.LimitShares) ------------------------------


def test_base_shares_split_the_limit_evenly_in_writer_order():
    """The remainder goes to the first writers by id, so every instance computes the same."""
    assert base_shares(60, ["s3", "s1", "s2"]) == {"s1": 20, "s2": 20, "s3": 20}
    assert base_shares(7, ["b", "a", "c"]) == {"a": 3, "b": 2, "c": 2}
    assert base_shares(5, []) == {}


@pytest.mark.parametrize(("limit", "demand", "targets"), [
    # Saturated: max-min fair, adding up to the limit.
    (60, {"a": 60, "b": 60, "c": 60}, {"a": 20, "b": 20, "c": 20}),
    (60, {"a": 5, "b": 60, "c": 60}, {"a": 5, "b": 28, "c": 27}),
    (60, {"a": 0, "b": 60, "c": 0}, {"a": 0, "b": 60, "c": 0}),
    # Under the limit: demand plus an even whole part of what is left.
    (4, {"a": 1, "b": 0, "c": 0}, {"a": 2, "b": 1, "c": 1}),
    (6, {"a": 0, "b": 0}, {"a": 3, "b": 3}),
])
def test_fair_targets(limit, demand, targets):
    """Max-min fair over demand; whole units, the same on every instance."""
    assert fair_targets(limit, demand) == targets


def test_PeerShares_reads_what_a_writer_published_and_refuses_the_malformed():
    """Counts may arrive as floats (sync carries JSON numbers); anything else is None."""
    parsed = PeerShares.from_wire({"w": "s1", "k": {"team": {"d": 12.0, "g": {"s2": 3}}}})
    assert parsed is not None
    assert parsed.demand == {"team": 12} and parsed.given == {"team": {"s2": 3}}
    for bad in (None, {"k": []}, {"k": {"team": {"d": -1}}}, {"k": {"team": {"g": {"x": 0.5}}}}):
        assert PeerShares.from_wire(bad) is None


def test_unused_elsewhere_is_what_the_others_hold_beyond_their_use():
    """s1 sees s2 and s3 with 20 each, having used 20 and 5: 15 could move to s1."""
    s1 = LimitShares("s1")
    assert s1.unused_elsewhere("team", 60, ["s1", "s2", "s3"], {},
                               {"s2": 20, "s3": 5}) == 15


def test_a_writer_counted_out_keeps_what_it_used_until_that_leaves_the_window():
    """s3 fell silent having used 15 of 60: s1 and s2 share the other 45, and all 60 once
    its counts have left the window (its usage counters say so)."""
    s1 = LimitShares("s1")
    assert live_limit(60, {"s2": 10, "s3": 15}, live={"s1", "s2"}) == 45
    assert s1.budget("team", 45, live={"s1", "s2"}, peers={}) == 23
    assert live_limit(60, {"s2": 10}, live={"s1", "s2"}) == 60
    assert live_limit(6, {"old": 9}, live={"s1"}) == 0


def test_a_single_instance_owns_the_whole_limit():
    """Alone, the share is the rpm: the limit is exact, as it always was."""
    shares = LimitShares("s1")
    assert shares.budget("team", 60, live={"s1"}, peers={}) == 60
    assert shares.rebalance("team", 60, live={"s1"}, peers={}, used=60, now=100.0) == []


def test_a_writer_gives_only_what_it_has_not_used():
    """s1 holds 20 of 60 and used 15; s2 wants all: s1 gives 5 now, and the rest only as
    its own requests leave the window (here: none, so nothing more)."""
    s1, s2 = LimitShares("s1"), LimitShares("s2")
    live = {"s1", "s2", "s3"}
    for _ in range(200):
        s2.arrived("team", 100.0)
    peers = {"s2": PeerShares.from_wire(s2.wire(100.0, {"team": 60}))}
    gifts = s1.rebalance("team", 60, live=live, peers=peers, used=15, now=100.0)
    assert gifts == [Gift(key="team", to="s2", units=5)]
    assert s1.budget("team", 60, live=live, peers=peers) == 15
    assert s1.rebalance("team", 60, live=live, peers=peers, used=15, now=100.1) == []
    # s2 counts the gift once it has seen s1's entry, and not before.
    assert s2.budget("team", 60, live=live, peers={}) == 20
    seen = {"s1": PeerShares.from_wire(s1.wire(100.0, {"team": 60}))}
    assert s2.budget("team", 60, live=live, peers=seen) == 25


def test_check_share_refuses_at_the_budget_and_says_when_it_frees():
    """Own count at the budget: refused until the oldest own counts leave the window;
    with no budget at all, until the key's oldest count anywhere leaves it."""
    own = [Slice(100.0, requests=2)]
    everywhere = [Slice(90.0, requests=3), Slice(100.0, requests=2)]
    assert check_share(key="team", rpm=6, budget=3, own=own, usage=everywhere, now=100.5) is None
    refused = check_share(key="team", rpm=6, budget=2, own=own, usage=everywhere, now=100.5)
    assert isinstance(refused, RateLimited)
    assert refused.retry_after_s == 61  # [100, 101) leaves at 161
    assert refused.message.endswith("this instance's share (2) is used; retry after 61s")
    none = check_share(key="team", rpm=6, budget=0, own=[], usage=everywhere, now=100.5)
    assert none is not None and none.retry_after_s == 51  # [90, 91) leaves at 151
    # Others hold budget they have not used: it moves here within a tick and a round trip.
    soon = check_share(key="team", rpm=6, budget=2, own=own, usage=everywhere, now=100.5,
                       unused_elsewhere=1)
    assert soon is not None and soon.retry_after_s == 1


class Fleet:
    """Writers that talk only through delayed copies of each other's published entries
    (the sync documents' role), on a fake clock; each admits by its own count and budget."""

    def __init__(self, limit: int, delays: dict[tuple[int, int], float]) -> None:
        self.limit = limit
        self.names = ["s1", "s2", "s3"]
        self.shares = [LimitShares(n) for n in self.names]
        self.delays = delays
        self.own: list[list[Slice]] = [[] for _ in self.names]
        self.views: list[dict[str, PeerShares]] = [{} for _ in self.names]
        self.in_flight: list[tuple[float, int, str, Any]] = []  # (due, to, from, entry)
        self.admitted: list[tuple[float, int]] = []
        self.running = [True, True, True]
        self.live: list[set[str]] = [set(self.names) for _ in self.names]  # each one's view

    def used(self, i: int, now: float) -> int:
        return sum(s.requests for s in self.own[i] if s.end + RATE_WINDOW_S > now)

    def seen_used(self, i: int, now: float) -> dict[str, int]:
        """The others' counts in the window as writer i has heard them (one delay late)."""
        seen = {}
        for j in range(3):
            if j != i:
                heard_until = now - self.delays[(min(i, j), max(i, j))]
                seen[self.names[j]] = sum(s.requests for s in self.own[j]
                                          if s.end + RATE_WINDOW_S > now
                                          and s.start <= heard_until)
        return seen

    def shared(self, i: int, now: float) -> int:
        """What writer i's live writers share (less what those it counted out used)."""
        return live_limit(self.limit, self.seen_used(i, now), self.live[i])

    def request(self, i: int, now: float) -> bool:
        if not self.running[i]:
            return False
        shares = self.shares[i]
        shares.arrived("team", now)
        budget = shares.budget("team", self.shared(i, now), self.live[i], self.views[i],
                               self.seen_used(i, now))
        if check_share(key="team", rpm=self.limit, budget=budget, own=self.own[i], usage=[],
                       now=now) is not None:
            return False
        self.own[i] = [s for s in self.own[i] if s.end + RATE_WINDOW_S > now]
        self.own[i].append(Slice(now, requests=1))  # (a slice per request: exact times)
        self.admitted.append((now, i))
        return True

    def tick(self, now: float) -> None:
        arrived = [m for m in self.in_flight if m[0] <= now]
        self.in_flight = [m for m in self.in_flight if m[0] > now]
        for _, to, sender, entry in sorted(arrived, key=lambda m: m[0]):
            self.views[to][sender] = PeerShares.from_wire(entry)
        for i, shares in enumerate(self.shares):
            if not self.running[i]:
                continue
            shares.rebalance("team", self.shared(i, now), live=self.live[i],
                             peers=self.views[i], used=self.used(i, now), now=now,
                             peer_used=self.seen_used(i, now))
            entry = shares.wire(now, {"team": self.limit})
            for j in range(3):
                if j != i:
                    delay = self.delays[(min(i, j), max(i, j))]
                    self.in_flight.append((now + delay, j, self.names[i], entry))

    def most_in_any_window(self) -> int:
        times = sorted(t for t, _ in self.admitted)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while times[lo] <= t - RATE_WINDOW_S:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


@pytest.mark.parametrize("scale", [0.0, 1.0, 20.0])
def test_shares_never_admit_more_than_the_limit_in_any_window_whatever_the_delay(scale):
    """Three writers 40/150/122 ms apart (times ``scale``: 0 to 3 s) under traffic that
    moves between them every 70 s, after a writer has used all it holds (all on one, on
    another, spread, two of three, a trickle): no 60 s window holds more than the rpm
    (giving away budget still in use would: 109 here), and the budget follows the
    traffic (the writer that is alone gets the whole rpm within a window)."""
    rng = random.Random(7)
    fleet = Fleet(60, {(0, 1): 0.040 * scale, (0, 2): 0.150 * scale, (1, 2): 0.122 * scale})
    clock = FakeClock(start=1000.0)
    step, next_tick = 0.01, clock.now()
    for rates in [(150, 0, 0), (0, 150, 0), (50, 50, 50), (0, 0, 150), (5, 145, 0),
                  (150, 150, 0), (0, 0, 1), (0, 150, 0), (0, 150, 0)]:
        end = clock.now() + 70.0
        while clock.now() < end:
            now = clock.advance(step)
            for i, rate in enumerate(rates):
                if rng.random() < rate * step:
                    fleet.request(i, now)
            if now >= next_tick:
                fleet.tick(now)
                next_tick = now + 0.1
    assert fleet.most_in_any_window() == 60
    # s2 alone for 140 s: all shares moved to it (a request counts for 60 to 61 s).
    last = [i for t, i in fleet.admitted if t > clock.now() - RATE_WINDOW_S - 1]
    assert last.count(1) == 60


def drive(fleet: Fleet, clock: FakeClock, rates: tuple[float, ...], seconds: float,
          rng: random.Random) -> None:
    step = 0.01
    end = clock.now() + seconds
    while clock.now() < end:
        now = clock.advance(step)
        for i, rate in enumerate(rates):
            if rng.random() < rate * step:
                fleet.request(i, now)
        if round(now * 100) % 10 == 0:
            fleet.tick(now)


def test_a_writer_that_leaves_costs_nothing():
    """All three saturated; s3 stops, and s1 and s2 count it out 5 s later: they share the
    rpm less what s3 used in the window, so no window holds more than the rpm."""
    rng = random.Random(3)
    fleet = Fleet(60, {(0, 1): 0.040, (0, 2): 0.150, (1, 2): 0.122})
    clock = FakeClock(start=1000.0)
    drive(fleet, clock, (50, 50, 50), 70.0, rng)
    fleet.running[2] = False
    drive(fleet, clock, (50, 50, 0), 5.0, rng)
    fleet.live[0] = fleet.live[1] = {"s1", "s2"}
    drive(fleet, clock, (50, 50, 0), 130.0, rng)
    assert fleet.most_in_any_window() == 60
    last = [i for t, i in fleet.admitted if t > clock.now() - RATE_WINDOW_S]
    assert len(last) == 60  # s3's part came back to the two others


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_a_writer_that_joins_costs_nothing(scale):
    """s1 and s2 saturated with 30 each; s3 joins and the bases move at once (20 each). s3's
    budget is capped by the room the others leave (their counts travel a delay late), so
    it admits only as their old requests leave: no window holds more than the rpm (with
    bases alone, 66 did), and s3 gets its part within a window."""
    rng = random.Random(5)
    delays = {(0, 1): 0.040 * scale, (0, 2): 0.150 * scale, (1, 2): 0.122 * scale}
    fleet = Fleet(60, delays)
    fleet.running[2] = False
    fleet.live = [{"s1", "s2"}, {"s1", "s2"}, {"s1", "s2", "s3"}]
    clock = FakeClock(start=1000.0)
    drive(fleet, clock, (50, 50, 0), 70.0, rng)
    fleet.running[2] = True
    drive(fleet, clock, (50, 50, 50), max(delays.values()), rng)  # s1 and s2 hear from s3
    fleet.live[0] = fleet.live[1] = {"s1", "s2", "s3"}
    drive(fleet, clock, (50, 50, 50), 130.0, rng)
    assert fleet.most_in_any_window() == 60
    last = [i for t, i in fleet.admitted if t > clock.now() - RATE_WINDOW_S]
    assert last.count(2) == 20


def test_a_key_used_at_one_instance_gets_the_whole_rpm_one_request_at_a_time():
    """rpm 6 over three writers (2 each); a client sends to s1 only, a request every 0.5 s:
    each time s1 is about to run out, an idle writer gives it a unit, so all six are
    admitted and only the seventh is refused."""
    fleet = Fleet(6, {(0, 1): 0.005, (0, 2): 0.020, (1, 2): 0.015})
    clock = FakeClock(start=1000.0)
    outcomes = []
    for _ in range(7):
        for _ in range(50):
            now = clock.advance(0.01)
            if round(now * 100) % 10 == 0:
                fleet.tick(now)
        outcomes.append(fleet.request(0, clock.now()))
    assert outcomes == [True] * 6 + [False]
