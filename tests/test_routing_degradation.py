"""Degradation levels and serving decisions, driven by upstream states and a fake clock."""

from __future__ import annotations

import pytest
from skyroute.routing import (
    LEVELS,
    Refuse,
    Router,
    Serve,
    UpstreamState,
    capped_payload,
    parse_config,
)

from .fakes import FakeClock

# Four upstreams: chat's two regions, the local pool serving chat-small (an implicit
# route), and one more serving a non-essential model.
CONFIG_TEXT = """\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b}}
  - {name: gpu, url: "http://g/v1", models: {chat-small: m-small}}
  - {name: d, url: "http://d/v1", models: {other: m-o}}
routes:
  - {model: chat, targets: [a, b], fallback_model: chat-small, essential: true, timeout: 60s}
  - {model: other, targets: [d]}
degradation:
  minimal: {when_available_below: 50%, max_tokens: 64, max_n: 1}
"""


def _router(text: str = CONFIG_TEXT) -> tuple[Router, FakeClock]:
    return Router(parse_config(text, env={})), FakeClock()


def _down(router: Router, clock: FakeClock, *names: str, for_s: float = 30.0) -> None:
    for name in names:
        router.mark(name, UpstreamState.DOWN, until=clock.now() + for_s, reason="test",
                    now=clock.now())


def _levels(router: Router, clock: FakeClock) -> dict[str, str]:
    config = router.config
    return {r.model: router.route_level(r, now=clock.now()) for r in config.routes}


LEVEL_CASES = [
    # (upstreams down, chat's level, other's level, minimal on)
    ((), "normal", "normal", False),
    (("a",), "reduced", "normal", False),
    (("a", "b"), "fallback", "normal", False),  # 2 of 4 available: not below 50 %
    (("a", "b", "d"), "minimal", "unavailable", True),  # 1 of 4: minimal
    (("a", "b", "gpu"), "unavailable", "minimal", True),  # no target, no fallback
    (("b", "d", "gpu"), "minimal", "unavailable", True),  # a still serves chat
]


@pytest.mark.parametrize(("down", "chat", "other", "minimal"), LEVEL_CASES)
def test_Router_route_level_follows_upstream_states(down, chat, other, minimal):
    """Each combination of upstreams down puts the routes at the level the table says."""
    router, clock = _router()
    _down(router, clock, *down)
    small = "unavailable" if "gpu" in down else "minimal" if minimal else "normal"
    assert _levels(router, clock) == {"chat": chat, "other": other, "chat-small": small}
    assert router.minimal(now=clock.now()).active is minimal
    assert router.level(now=clock.now()) == max(chat, other, small, key=LEVELS.index)


def test_Router_level_changes_are_reported_once_with_their_reason():
    """Every level a route passes through is reported once, going down and coming back."""
    router, clock = _router()
    seen = []
    for down in [("a",), ("b",), ("d",)]:
        _down(router, clock, *down)
        seen += [(c.route, c.old, c.new) for c in router.level_changes(now=clock.now())]
        assert router.level_changes(now=clock.now()) == []  # nothing new: nothing reported
    clock.advance(31.0)  # every "down" has expired
    back = router.level_changes(now=clock.now())
    assert seen == [("chat", "normal", "reduced"), ("chat", "reduced", "fallback"),
                    ("chat", "fallback", "minimal"), ("other", "normal", "unavailable"),
                    ("chat-small", "normal", "minimal")]
    assert {(c.route, c.new) for c in back} == {("chat", "normal"), ("other", "normal"),
                                                ("chat-small", "normal")}


def test_Router_level_change_reasons_name_what_happened():
    """Reasons say which target is out, which fallback serves, and the minimal numbers."""
    router, clock = _router()
    _down(router, clock, "a")
    (reduced,) = router.level_changes(now=clock.now())
    assert reduced.reason == "first target a is down; serving from b"
    _down(router, clock, "b")
    (fallback,) = router.level_changes(now=clock.now())
    assert fallback.reason == "no target is available (a down, b down); serving fallback " \
                              "model chat-small"
    _down(router, clock, "d")
    changes = {c.route: c for c in router.level_changes(now=clock.now())}
    assert "1 of 4 upstreams are available (25%" in changes["chat"].reason
    assert "no fallback model can serve" in changes["other"].reason


def test_Router_serving_uses_the_fallback_route_at_level_fallback():
    """With every chat target out, chat requests are served by chat-small's route."""
    router, clock = _router()
    _down(router, clock, "a", "b")
    decision = router.serving(router.route_for("chat"), n=None, now=clock.now())
    assert isinstance(decision, Serve)
    assert (decision.route.model, decision.fallback_for, decision.level) == (
        "chat-small", "chat", "fallback")
    assert decision.max_tokens is None
    assert router.fallbacks(now=clock.now()) == {"chat": "chat-small"}


def test_Router_serving_in_minimal_refuses_routes_not_marked_essential():
    """In minimal mode a non-essential route is refused, naming the essential ones."""
    router, clock = _router()
    _down(router, clock, "b", "d", "gpu")
    decision = router.serving(router.route_for("other"), n=None, now=clock.now())
    assert isinstance(decision, Refuse) and decision.reason == "not_essential"
    assert "only essential models (chat)" in decision.message
    assert "'other' is not essential" in decision.message
    assert 1.0 <= decision.retry_after_s <= 30.0


def test_Router_serving_in_minimal_caps_essential_routes_and_refuses_n_above_max():
    """An essential route is served with max_tokens capped; n above max_n is refused."""
    router, clock = _router()
    _down(router, clock, "b", "d", "gpu")
    chat = router.route_for("chat")
    decision = router.serving(chat, n=1, now=clock.now())
    assert isinstance(decision, Serve)
    assert (decision.route.model, decision.max_tokens, decision.level) == ("chat", 64, "minimal")
    refused = router.serving(chat, n=3, now=clock.now())
    assert isinstance(refused, Refuse) and refused.reason == "n_above_max"
    assert refused.param == "n" and "asked for n=3" in refused.message


def test_Router_minimal_mode_needs_an_essential_route():
    """With no route marked essential, minimal never starts, however few upstreams are left."""
    router, clock = _router(CONFIG_TEXT.replace("essential: true", "essential: false"))
    _down(router, clock, "a", "b", "d")
    assert not router.minimal(now=clock.now()).active
    assert isinstance(router.serving(router.route_for("other"), n=4, now=clock.now()), Serve)


def test_Router_minimal_trigger_is_configurable():
    """when_available_below: 0% turns minimal off; 80% starts it with one upstream of four out."""
    router, clock = _router(CONFIG_TEXT.replace("50%", "0%"))
    _down(router, clock, "a", "b", "d")
    assert router.route_level(router.route_for("chat"), now=clock.now()) == "fallback"
    router, clock = _router(CONFIG_TEXT.replace("50%", "80%"))
    _down(router, clock, "d")
    assert router.route_level(router.route_for("chat"), now=clock.now()) == "minimal"


def test_Router_fallback_disabled_goes_from_reduced_to_unavailable():
    """degradation.fallback.enabled: false leaves no fallback level."""
    router, clock = _router(CONFIG_TEXT + "  fallback: {enabled: false}\n")
    _down(router, clock, "a", "b")
    chat = router.route_for("chat")
    assert router.route_level(chat, now=clock.now()) == "unavailable"
    assert router.fallback_after_failure(chat, deadline=clock.now() + 60, now=clock.now()) \
        is None
    (change, *_) = router.level_changes(now=clock.now())
    assert "fallback is disabled" in change.reason


def test_Router_fallback_chain_is_followed_to_an_available_route():
    """chat -> mid -> chat-small: with mid's targets out too, chat-small serves."""
    text = CONFIG_TEXT.replace(
        "  - {model: other, targets: [d]}",
        "  - {model: other, targets: [d]}\n"
        "  - {model: mid, targets: [d], fallback_model: chat-small}").replace(
        "fallback_model: chat-small, essential", "fallback_model: mid, essential").replace(
        "models: {other: m-o}", "models: {other: m-o, mid: m-mid}")
    router, clock = _router(text.replace("50%", "0%"))
    _down(router, clock, "a", "b", "d")
    decision = router.serving(router.route_for("chat"), n=None, now=clock.now())
    assert isinstance(decision, Serve) and decision.route.model == "chat-small"


def test_Router_fallback_after_failure_gets_what_is_left_of_the_deadline():
    """After the route's attempts failed, its fallback gets the rest of the request deadline."""
    router, clock = _router()
    chat = router.route_for("chat")
    deadline = clock.now() + 60.0
    clock.advance(45.0)
    fallback = router.fallback_after_failure(chat, deadline=deadline, now=clock.now())
    assert fallback is not None and fallback.model == "chat-small"
    assert fallback.timeout_s == pytest.approx(15.0)
    clock.advance(15.0)
    assert router.fallback_after_failure(chat, deadline=deadline, now=clock.now()) is None
    _down(router, clock, "gpu")
    assert router.fallback_after_failure(chat, deadline=clock.now() + 60, now=clock.now()) \
        is None


CHAT = {"model": "chat", "messages": []}
CAP_CASES = [
    # (payload, cap, capped payload or None for unchanged)
    ({**CHAT, "max_tokens": 1000}, 64, {**CHAT, "max_tokens": 64}),
    (CHAT, 64, {**CHAT, "max_tokens": 64}),  # added when the request sets no limit
    ({**CHAT, "max_completion_tokens": 10}, 64, None),  # already under the cap
    ({**CHAT, "max_completion_tokens": 100}, 64, {**CHAT, "max_completion_tokens": 64}),
    ({**CHAT, "max_tokens": "lots"}, 64, None),  # not a number: the upstream refuses it
    ({"model": "e", "input": "x"}, 64, None),  # not a generation request
    ({**CHAT, "max_tokens": 1000}, None, None),  # not in minimal mode
    (None, 64, None),
]


@pytest.mark.parametrize(("payload", "cap", "expected"), CAP_CASES)
def test_capped_payload_lowers_or_adds_token_limits_of_generation_requests(payload, cap,
                                                                           expected):
    """Minimal mode's cap lowers max_tokens/max_completion_tokens above it, adds max_tokens
    when neither is set, and touches nothing else."""
    assert capped_payload(payload, cap) == expected
