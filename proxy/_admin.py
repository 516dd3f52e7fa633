"""The admin API: ``GET /admin/routing``, and the traffic share it reports.

``add_admin_routes(app)`` registers the endpoint; the traffic shares it reports
come from the application's ``TrafficShare`` (``app[TRAFFIC]``), which the
attempt loop feeds with the upstream that served each request. Every admin call needs
``Authorization: Bearer <admin.key>``: with no ``admin.key`` in the routing file
the admin API is off (403, saying how to turn it on), and a missing or wrong key
is a 401. The answer is read-only and built from ``routing``'s own snapshot, so
it says exactly what the router decides on.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from skyroute.routing import Route, Router, TrafficShare, UpstreamHealth, UpstreamState

from ._auth import is_admin
from ._errors import AdminDisabled, InvalidApiKey
from ._headers import bearer_token
from ._prometheus import PROMETHEUS_STATUS
from ._state import CLOCK, SERVING, TRAFFIC


def add_admin_routes(app: web.Application) -> None:
    """Serve ``/admin/routing``."""
    app.router.add_get("/admin/routing", handle_admin_routing)


def check_admin(request: web.Request, admin_key: str | None) -> None:
    """Let the request through only with the configured admin key.

    Raises:
        AdminDisabled: no ``admin.key`` is configured (403).
        InvalidApiKey: the key is missing or wrong (401).
    """
    if not admin_key:
        raise AdminDisabled("the admin API is off: set admin.key in the routing file "
                            "(admin: {key: ...}) and send it as 'Authorization: Bearer <key>'")
    given = bearer_token(request)
    if given is None:
        raise InvalidApiKey("missing admin key: send admin.key as 'Authorization: Bearer <key>'")
    if not is_admin(request, admin_key):
        raise InvalidApiKey("incorrect admin key; it must equal admin.key in the routing file")


async def handle_admin_routing(request: web.Request) -> web.Response:
    """``GET /admin/routing``: per route and upstream, what routing sees and decides."""
    runtime = request.app[SERVING].runtime
    check_admin(request, runtime.config.admin_key)
    router, latency = runtime.router, runtime.config.latency
    now = request.app[CLOCK]()
    traffic = request.app[TRAFFIC]
    status = request.app.get(PROMETHEUS_STATUS)
    return web.json_response({
        "instance": runtime.config.instance_id,
        "level": router.level(now=now),
        "share_window_s": traffic.window_s,
        "latency": {
            "interval_s": latency.interval_s, "passive_window_s": latency.passive_window_s,
            "probe_share": latency.probe_share, "recover_ratio": latency.recover_ratio,
            "recover_intervals": latency.recover_intervals, "ramp_s": latency.ramp_s,
            "prometheus": status.describe(now=now) if status is not None else None,
            "scrape": {
                "interval_s": latency.scrape.interval_s, "timeout_s": latency.scrape.timeout_s,
                "metrics_path": latency.scrape.metrics_path,
                "health_path": latency.scrape.health_path,
                "unhealthy_after": latency.scrape.unhealthy_after,
                "pools": [u.name for u in router.scraped_pools],
            },
        },
        "routes": {route.model: _route(router, route, traffic, now)
                   for route in runtime.config.routes},
    })


def _route(router: Router, route: Route, traffic: TrafficShare, now: float) -> dict[str, Any]:
    counts = traffic.counts(route.model, now=now)
    total = sum(counts.values())
    snapshot = router.snapshot(now=now)
    return {
        "strategy": route.strategy,
        "latency_threshold_ms": round(route.latency_threshold_s * 1000, 1),
        "level": router.route_level(route, now=now),
        "requests": total,
        "upstreams": {name: _upstream(router.health(name), snapshot[name], counts.get(name, 0),
                                      total, now) for name in route.targets},
    }


def _upstream(health: UpstreamHealth, entry: dict[str, Any], served: int, total: int,
              now: float) -> dict[str, Any]:
    passive = health.latency.p95(now=now)
    external = health.external
    change = health.last_change
    return {
        "state": entry["state"],
        "slow": entry["state"] is UpstreamState.SLOW,
        "healthy": entry["state"] is UpstreamState.HEALTHY,
        "region": entry["region"],
        "latency_ms": entry.get("latency_ms"),
        "latency_source": entry.get("latency_source"),
        "passive_p95_ms": None if passive is None else round(passive * 1000, 1),
        "prometheus_ms": None if external is None else round(external.seconds * 1000, 1),
        "prometheus_age_s": None if external is None else round(now - external.at, 1),
        "share": round(served / total, 4) if total else 0.0,
        "served": served,
        # 0 while slow; climbs from 0.1 to 1 along the recovery ramp.
        "ramp": round(health.share(now=now), 3),
        "outstanding": entry["outstanding"],
        # Pools only: each server's health, reported load and skyroute's count there.
        "endpoints": entry.get("endpoints"),
        "last_change": None if change is None else {
            "old": change.old, "new": change.new, "reason": change.reason,
            "s_ago": round(now - change.at, 1)},
    }
