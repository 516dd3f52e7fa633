"""Reading the routing file's policy sections into the dataclasses of ``_policies``.

One reader per top-level section (``retry``, ``breaker``, ``latency`` with its
``prometheus`` and ``scrape`` parts, ``sessions``, ``sync``, ``degradation``).
Each records problems on the ``Fields`` it is given and returns the defaults for
what it could not read, so ``routing.config`` can report every problem at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ._errors import ConfigProblem
from ._policies import (
    BreakerPolicy,
    DegradationPolicy,
    LatencyPolicy,
    ObjectPolicy,
    PoolScrape,
    PrometheusSource,
    RetryPolicy,
    SessionPolicy,
    SyncPolicy,
    is_metric_name,
)
from ._pool import DEFAULT_METRIC_NAMES, PoolMetricNames
from ._yaml import (
    COUNT,
    DURATION,
    SHARE,
    Fields,
    keywords,
    parse_bool,
    parse_count,
    parse_duration,
    parse_share,
    section,
)


def read_retry(top: Fields) -> RetryPolicy:
    """The ``retry`` section."""
    return section(top, "retry", RetryPolicy, {
        "backoff_base": ("backoff_base_s", parse_duration, DURATION),
        "backoff_cap": ("backoff_cap_s", parse_duration, DURATION),
        "budget": ("budget", parse_share, SHARE),
        "budget_window": ("budget_window_s", parse_duration, DURATION),
        "hedge_budget": ("hedge_budget", parse_share, SHARE),
        "bad_key_cooldown": ("bad_key_cooldown_s", parse_duration, DURATION),
        "default_retry_after": ("default_retry_after_s", parse_duration, DURATION)})


def read_breaker(top: Fields) -> BreakerPolicy:
    """The ``breaker`` section."""
    return section(top, "breaker", BreakerPolicy, {
        "consecutive_failures": ("consecutive_failures", parse_count, COUNT),
        "failure_rate": ("failure_rate", parse_share, SHARE),
        "min_requests": ("min_requests", parse_count, COUNT),
        "window": ("window_s", parse_duration, DURATION),
        "cooldown": ("cooldown_s", parse_duration, DURATION),
        "max_cooldown": ("max_cooldown_s", parse_duration, DURATION)})


def read_objects(top: Fields) -> ObjectPolicy:
    """The ``objects`` section (stateful objects stay with their upstream)."""
    return section(top, "objects", ObjectPolicy, {
        "ttl": ("ttl_s", parse_duration, DURATION),
        "max_entries": ("max_entries", parse_count, COUNT)})


def read_sessions(top: Fields) -> SessionPolicy:
    """The ``sessions`` section."""
    return section(top, "sessions", SessionPolicy, {
        "header": ("header", str, "a header name"),
        "ttl": ("ttl_s", parse_duration, DURATION)})


def read_degradation(top: Fields) -> DegradationPolicy:
    """The ``degradation`` section: one sub-mapping per level it configures."""
    fields = top.mapping("degradation")
    if fields is None:
        return DegradationPolicy()
    levels: dict[str, dict[str, tuple[str, Any, str]]] = {
        "reduced": {"hedging": ("reduced_hedging", parse_bool, "true or false")},
        "fallback": {"enabled": ("fallback_enabled", parse_bool, "true or false")},
        "minimal": {"when_available_below": ("minimal_below", parse_share, SHARE),
                    "max_tokens": ("minimal_max_tokens", parse_count, COUNT),
                    "max_n": ("minimal_max_n", parse_count, COUNT)}}
    kwargs: dict[str, Any] = {}
    for level, spec in levels.items():
        section = fields.mapping(level)
        if section is not None:
            kwargs.update(keywords(section, spec))
            section.finish(allowed=set(spec))
    fields.finish(allowed=set(levels))
    try:
        return DegradationPolicy(**kwargs)
    except ValueError as exc:
        fields.problem(None, str(exc))
        return DegradationPolicy()


def read_sync(top: Fields) -> SyncPolicy | None:
    fields = top.mapping("sync")
    if fields is None:
        return None
    token = fields.text("token")
    if not token:
        fields.problem("token", "is required: a shared secret from the environment, e.g. "
                                "token: ${SKYROUTE_SYNC_TOKEN}")
    peers = tuple(str(p) for _, _, p in fields.items("peers"))
    kwargs = keywords(fields, {
        "discovery": ("discovery", str, "dns:<service name>[:port]"),
        "discovery_interval": ("discovery_interval_s", parse_duration, DURATION),
        "rotate_every": ("rotate_every_s", parse_duration, DURATION),
        "snapshot": ("snapshot_path", str, "a file path")})
    fields.finish()
    if not token:
        return None
    try:
        return SyncPolicy(token=token, peers=peers, **kwargs)
    except ValueError as exc:
        fields.problem(None, str(exc))
        return None


def read_latency(top: Fields) -> LatencyPolicy:
    fields = top.mapping("latency")
    prometheus, scrape = None, PoolScrape()
    if fields is not None:
        scrape = _pool_scrape(fields)
        prom = fields.mapping("prometheus")
        if prom is not None:
            url = prom.text("url", required=True)
            kwargs = keywords(prom, {
                "query": ("query", str, "a PromQL query"),
                "interval": ("interval_s", parse_duration, DURATION),
                "timeout": ("timeout_s", parse_duration, DURATION),
                "label": ("label", str, "a label name")})
            prom.finish()
            if url:
                try:
                    prometheus = PrometheusSource(url=url, **kwargs)
                except ValueError as exc:
                    prom.problem("url", str(exc))
    return section(top, "latency", LatencyPolicy, {
        "passive_window": ("passive_window_s", parse_duration, DURATION),
        "interval": ("interval_s", parse_duration, DURATION),
        "probe_share": ("probe_share", parse_share, SHARE),
        "recover_ratio": ("recover_ratio", parse_share, SHARE),
        "recover_intervals": ("recover_intervals", parse_count, COUNT),
        "ramp": ("ramp_s", parse_duration, DURATION)},
        more_keys=("prometheus", "scrape"), prometheus=prometheus, scrape=scrape)


def _pool_scrape(latency: Fields) -> PoolScrape:
    """``latency.scrape``: how the servers of local GPU pools are watched."""
    return section(latency, "scrape", PoolScrape, {
        "interval": ("interval_s", parse_duration, DURATION),
        "timeout": ("timeout_s", parse_duration, DURATION),
        "metrics_path": ("metrics_path", str, "a URL path like /metrics"),
        "health_path": ("health_path", str, "a URL path like /health or /v1/models"),
        "unhealthy_after": ("unhealthy_after", parse_count, COUNT)},
        more_keys=("metrics",), metrics=_pool_metric_names(latency))


def _pool_metric_names(latency: Fields) -> PoolMetricNames:
    """``latency.scrape.metrics``: each list given replaces that quantity's default names."""
    # Only a mapping is read here: _section reports a scrape that is not one, once.
    scrape = latency.mapping("scrape") if isinstance(latency.data.get("scrape"), Mapping) \
        else None
    fields = scrape.mapping("metrics") if scrape is not None else None
    if fields is None:
        return DEFAULT_METRIC_NAMES
    names: dict[str, tuple[str, ...]] = {}
    for key in ("waiting", "running", "kv_cache_usage"):
        if key not in fields.data:
            continue
        given = []
        for path, line, name in fields.items(key):
            if isinstance(name, str) and is_metric_name(name):
                given.append(name)
            else:
                fields.problems.append(ConfigProblem(
                    path, line, f"{name!r} is not a Prometheus metric name "
                                "(e.g. vllm:num_requests_waiting)"))
        names[key] = tuple(given)
    fields.finish(allowed={"waiting", "running", "kv_cache_usage"})
    return dataclasses.replace(DEFAULT_METRIC_NAMES, **names)
