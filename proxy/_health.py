"""Reporting upstream health: state-change log lines, gauges, ``/health``, the ticker.

``routing`` decides states, degradation levels and what health is gossiped
between instances; this module only tells the outside world about them and
carries the gossip to and from the shared store. Every state change is one log line (``bad_key`` at
error level, since only a human can fix a key or a balance), every route level
change too, and the gauges in ``/metrics`` follow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import structlog
from aiohttp import web
from skyroute.routing import (
    LEVELS,
    STATES,
    Finding,
    HealthChange,
    Level,
    Publish,
    Router,
    TrafficShare,
    UpstreamState,
    Withdraw,
    gossip_decisions,
)
from skyroute.statesync import SessionStore

from ._auth import is_admin
from ._cache import CACHE
from ._jobs_runner import JOBS
from ._metrics import Metrics
from ._state import CLOCK, METRICS, SERVING, STATE_SYNC, TRAFFIC, UPSTREAM_SESSIONS
from ._tasks import running

log = structlog.get_logger("skyroute.health")


def report_changes(changes: Iterable[HealthChange | None], router: Router, metrics: Metrics,
                   ) -> None:
    """Log each change once and bring the state gauges up to date.

    A state change may change route levels too; those are reported at once.
    """
    last: HealthChange | None = None
    for change in changes:
        if change is None:
            continue
        last = change
        try:
            region = router.config.upstream(change.upstream).region
        except KeyError:  # removed by a reload since
            region = "-"
        # bad_key at error level: only a human can fix a key or a balance.
        level = "error" if change.new is UpstreamState.BAD_KEY else "warning" \
            if change.new is not UpstreamState.HEALTHY else "info"
        getattr(log, level)("upstream_state_changed", upstream=change.upstream, region=region,
                            **{"from": change.old, "to": change.new}, reason=change.reason)
        metrics.health_changes.labels(change.upstream, change.new).inc()
        _set_state_gauges(metrics, change.upstream, change.new)
    if last is not None:
        report_level_changes(router, metrics, now=last.at)


def report_level_changes(router: Router, metrics: Metrics, *, now: float) -> None:
    """Log each route level change once; set the level and minimal-mode gauges."""
    for change in router.level_changes(now=now):
        level = "info" if change.new is Level.NORMAL else "error" \
            if change.new is Level.UNAVAILABLE else "warning"
        getattr(log, level)("route_level_changed", route=change.route,
                            **{"from": change.old, "to": change.new}, reason=change.reason)
        metrics.degradation_changes.labels(change.route, change.new).inc()
        metrics.degradation_level.labels(change.route).set(LEVELS.index(change.new))
    metrics.minimal_mode.set(1 if router.minimal(now=now).active else 0)


def _set_state_gauges(metrics: Metrics, upstream: str, current: UpstreamState) -> None:
    for state in STATES:
        metrics.upstream_state.labels(upstream, state).set(1 if state is current else 0)


def refresh_gauges(router: Router, metrics: Metrics, *, now: float) -> None:
    """Set every upstream's state/estimate gauges and every route's level gauge.

    Levels also change with time alone (a cool-down ending), so level changes
    are reported here too. Every configured upstream's TTFB histogram series
    exists from the start, at zero: a series born with its first requests would
    lose them to Prometheus's ``rate()``.
    """
    for name, entry in router.snapshot(now=now).items():
        _set_state_gauges(metrics, name, entry["state"])
    metrics.replace_series(metrics.latency_estimate, {  # a stale source leaves no old value
        (name, source): seconds for name, estimates in router.exported_estimates(now=now).items()
        for source, seconds in estimates.items()})
    for upstream in router.config.upstreams:
        metrics.ttfb.labels(upstream.name, upstream.region)
    report_level_changes(router, metrics, now=now)
    for model, level in router.route_levels(now=now).items():
        metrics.degradation_level.labels(model).set(LEVELS.index(level))


def gossip(router: Router, store: SessionStore, *, now: float) -> list[HealthChange | None]:
    """Share this instance's bad_key/down findings and take the other instances'.

    ``routing.gossip_decisions`` decides (a report about an upstream that has answered
    here since is withdrawn, not taken); the store speaks wall-clock time and the router the
    instance's clock, so findings and adopted reports cross as "seconds from now".
    """
    wall = time.time()
    findings = {name: Finding(state=entry["state"], for_s=entry.get("until_s"),
                              answering=router.health(name).is_answering())
                for name, entry in router.snapshot(now=now).items()}
    changes = []
    for decision in gossip_decisions(findings, store.upstream_reports(now=wall), now=wall):
        if isinstance(decision, Publish):
            store.report_upstream(decision.upstream, decision.state, until=decision.until,
                                  now=wall)
        elif isinstance(decision, Withdraw):
            store.report_upstream(decision.upstream, UpstreamState.HEALTHY, until=None,
                                  now=wall)
        else:
            changes.append(router.mark(decision.upstream, decision.state,
                                       until=now + decision.for_s, reason=decision.reason,
                                       now=now))
    return changes


async def handle_health(request: web.Request) -> web.Response:
    """``GET /health``: the degradation level and every upstream's state, as JSON.

    Anyone may read levels and states; reasons, URLs, addresses and the config
    file's path only go to a caller with the admin key (``"view": "admin"``).
    """
    runtime = request.app[SERVING].runtime
    router = runtime.router
    now = request.app[CLOCK]()
    minimal = router.minimal(now=now)
    body = {
        "level": router.level(now=now),
        "routes": router.route_levels(now=now),
        "fallbacks": router.fallbacks(now=now),
        "minimal": {"active": minimal.active, "available": minimal.available,
                    "upstreams": minimal.upstreams,
                    "when_available_below": minimal.below,
                    "essential": list(minimal.essential)},
        "instance": runtime.config.instance_id,
        "config": {"source": runtime.config.source, "loaded_at": runtime.loaded_at},
        "upstreams": _with_clouds(router.snapshot(now=now),
                                  request.app[UPSTREAM_SESSIONS].clouds.health()),
        "peers": request.app[STATE_SYNC].peer_states(),
        "cache": request.app[CACHE].state(),
    }
    if JOBS in request.app:
        body["jobs"] = await request.app[JOBS].health()
    if is_admin(request, runtime.config.admin_key):
        return web.json_response({"view": "admin", **body})
    return web.json_response({"view": "public", **public_health(body)})


def _with_clouds(upstreams: dict[str, Any], clouds: dict[str, dict[str, Any]]
                 ) -> dict[str, Any]:
    """Cloud upstreams' entries also say their provider and whether their identity is valid."""
    for name, cloud in clouds.items():
        if name in upstreams:
            upstreams[name] = {**upstreams[name], **cloud}
    return upstreams


def public_health(body: dict[str, Any]) -> dict[str, Any]:
    """``/health`` for anyone: levels and states, no reasons, URLs or addresses."""
    upstreams = {}
    for name, entry in body["upstreams"].items():
        entry = {k: v for k, v in entry.items() if k != "last_change"}
        if "endpoints" in entry:  # keyed by URL: keep the order, drop the addresses
            entry["endpoints"] = list(entry["endpoints"].values())
        upstreams[name] = entry
    return {**body, "config": {"loaded_at": body["config"]["loaded_at"]},
            "upstreams": upstreams, "peers": sorted(body["peers"].values())}


async def health_ticker(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: re-evaluate latency estimates once per ``latency.interval``."""

    async def loop() -> None:
        clock = app[CLOCK]
        while True:
            router = app[SERVING].runtime.router
            await asyncio.sleep(router.config.latency.interval_s)
            now = clock()
            report_changes(router.tick(now=now), router, app[METRICS])
            report_changes(gossip(router, app[STATE_SYNC].store, now=now), router, app[METRICS])
            refresh_gauges(router, app[METRICS], now=now)
            refresh_share_gauges(app[TRAFFIC], router, app[METRICS], now=now)

    refresh_gauges(app[SERVING].runtime.router, app[METRICS],
                   now=app[CLOCK]())
    async with running(loop(), name="skyroute-health-ticker"):
        yield


def refresh_share_gauges(traffic: TrafficShare, router: Router, metrics: Metrics, *,
                         now: float) -> None:
    """Set ``skyroute_routing_share`` for every route target (0 with no traffic)."""
    routes = router.config.routes
    traffic.forget({route.model for route in routes})
    values = {}
    for route in routes:
        shares = traffic.share(route.model, now=now)
        for name in route.targets:
            values[route.model, name] = round(shares.get(name, 0.0), 4)
    metrics.replace_series(metrics.routing_share, values)  # drops what a reload removed
