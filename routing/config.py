"""The routing configuration: frozen, validated, typed.

``load_config(path)`` reads a routing YAML file and returns a ``Config`` or raises
``ConfigError`` listing every problem with its YAML path and line. Decision code
never sees a raw dict: every section becomes a frozen dataclass whose
``__post_init__`` rejects what cannot work. Per-route overrides are made with
``dataclasses.replace``. This module reads the file's shape (listen, instance,
auth, upstreams, routes); the policy sections are read by ``routing._sections``.

Vocabulary follows Envoy: an *upstream* is a cluster (one provider account in one
region, or a pool of self-hosted servers = its *endpoints*); a *route* maps a model
alias the client asks for to an ordered list of upstream *targets*.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._errors import ConfigError, ConfigProblem
from ._policies import (
    DEFAULT_PROMETHEUS_QUERY,
    BreakerPolicy,
    DegradationPolicy,
    LatencyPolicy,
    PoolScrape,
    PrometheusSource,
    RetryPolicy,
    SessionPolicy,
    Strategy,
    SyncPolicy,
)
from ._sections import (
    read_breaker,
    read_degradation,
    read_latency,
    read_retry,
    read_sessions,
    read_sync,
)
from ._yaml import (
    COUNT,
    DURATION,
    Fields,
    keywords,
    parse_bool,
    parse_count,
    parse_duration,
    parse_size,
    parse_yaml,
    section,
)

#: Request bodies above this are refused with 413; chat payloads with long contexts
#: and a few images stay well under it.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: A busy DeepSeek keeps a connection open for ~10 minutes with keep-alives only;
#: 30 s is long enough for a cold large model and far shorter than that.
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Longest silence between two bytes once an answer has started.
DEFAULT_IDLE_TIMEOUT_S = 60.0
#: Overall deadline for one client request, all attempts together.
DEFAULT_ROUTE_TIMEOUT_S = 600.0
DEFAULT_MAX_ATTEMPTS = 3

#: Client-side limits default to nginx's own defaults or stricter:
#: ``client_header_timeout`` 60s, ``client_body_timeout`` 60s, ``keepalive_timeout``
#: 75s, ``worker_connections`` 512.
DEFAULT_HEAD_TIMEOUT_S = 60.0
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 75.0
DEFAULT_MAX_CLIENT_CONNECTIONS = 512
#: Longest wait for a free connection to an upstream (its ``max_connections``)
#: before the next target is tried; the wait is not held against the upstream.
DEFAULT_POOL_TIMEOUT_S = 2.0

__all__ = [
    "DEFAULT_PROMETHEUS_QUERY",
    "ApiKey",
    "BreakerPolicy",
    "Config",
    "DegradationPolicy",
    "LatencyPolicy",
    "Limits",
    "Listen",
    "PoolScrape",
    "PrometheusSource",
    "RetryPolicy",
    "Route",
    "SessionPolicy",
    "SyncPolicy",
    "Upstream",
    "load_config",
    "parse_config",
]

STRATEGIES = tuple(Strategy)


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")

    @classmethod
    def parse(cls, value: object) -> Listen:
        """``host:port``, ``:port`` or a bare port number."""
        text = str(value)
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", text
        if not port.isdigit():
            raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8080)")
        return cls(host=host.strip("[]") or "0.0.0.0", port=int(port))


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    """A client key: who may call skyroute, and (with state sync) their limits."""

    name: str
    key: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None  # requests in flight at once, on this instance

    def __repr__(self) -> str:  # never print the key itself
        return (f"ApiKey(name={self.name!r}, rpm={self.rpm}, tpm={self.tpm}, "
                f"max_concurrent={self.max_concurrent})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """One upstream cluster: a provider region, or a pool of self-hosted servers."""

    name: str
    endpoints: tuple[str, ...]
    api_key: str | None = field(default=None, repr=False)
    region: str = "default"
    models: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    first_token_timeout_s: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_connections: int = 256  # connections to each endpoint at once (requests in flight)
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S  # longest wait for one of them
    weight: int = 1  # share of traffic under the 'weighted' strategy
    #: For a pool: scrape and health-check its servers (``latency.scrape``). Off, the
    #: pool picks by skyroute's own in-flight counts alone.
    scrape: bool = True

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("needs 'url' or 'endpoints'")
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {url!r} must start with http:// or https://")
        object.__setattr__(self, "endpoints", tuple(u.rstrip("/") for u in self.endpoints))
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    @property
    def is_pool(self) -> bool:
        return len(self.endpoints) > 1

    def model_for(self, alias: str) -> str:
        """The upstream's own name for ``alias`` (the alias itself if not mapped)."""
        return self.models.get(alias, alias)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Which upstreams serve a model alias, in preference order."""

    model: str
    targets: tuple[str, ...]
    strategy: Strategy = Strategy.LOWEST_LATENCY
    latency_threshold_s: float = 0.2
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S
    #: Start the same request on the next upstream if no first token came by then:
    #: a fixed delay, or ``"p95"`` for the first upstream's current p95 TTFB.
    hedge_after: float | str | None = None
    #: Continue a stream cut after its first content byte on the next upstream, sending
    #: the partial answer back as an assistant prefix (chat completions only).
    resume: bool = False
    #: Another route's model alias that serves this route's requests when none of its
    #: targets is available (or all its attempts failed), e.g. a small distilled model.
    fallback_model: str | None = None
    #: Still served when skyroute is in ``minimal`` mode (other routes are refused then).
    essential: bool = False
    implicit: bool = False  # made from upstreams' model maps, not written in YAML

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if isinstance(self.hedge_after, str) and self.hedge_after != "p95":
            raise ValueError("hedge_after must be a duration such as 2s, or p95")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one client may take: body size, time to send, connections."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S  # whole request head, from its first byte
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # longest pause while sending the body
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S  # an idle connection is closed
    max_client_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("head_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.removesuffix('_s')} must be more than 0")
        if self.max_client_connections < 1:
            raise ValueError("max_client_connections must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A whole, validated routing file."""

    listen: Listen = field(default_factory=Listen)
    instance_id: str = "skyroute"
    api_keys: tuple[ApiKey, ...] | None = None  # None: no auth section, skyroute runs open
    admin_key: str | None = field(default=None, repr=False)
    limits: Limits = field(default_factory=Limits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    latency: LatencyPolicy = field(default_factory=LatencyPolicy)
    sessions: SessionPolicy = field(default_factory=SessionPolicy)
    sync: SyncPolicy | None = None  # None: state stays on this instance
    degradation: DegradationPolicy = field(default_factory=DegradationPolicy)
    upstreams: tuple[Upstream, ...] = ()
    routes: tuple[Route, ...] = ()
    source: str = "<memory>"

    def upstream(self, name: str) -> Upstream:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)

    def route_for(self, model: str) -> Route | None:
        for route in self.routes:
            if route.model == model:
                return route
        return None


_TOP_KEYS = {"listen", "instance", "auth", "admin", "limits", "retry", "breaker", "latency",
             "sessions", "sync", "upstreams", "routes", "degradation"}


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a routing file.

    Raises:
        ConfigError: listing every problem found (file unreadable, YAML syntax,
            unknown keys, bad values, dangling route targets, unset ``${VAR}``).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [ConfigProblem("(file)", None, f"cannot read: {exc}")]) from exc
    return parse_config(text, source=source, env=env)


def parse_config(text: str, *, source: str = "<memory>",
                 env: Mapping[str, str] | None = None) -> Config:
    """Validate routing YAML given as text; see ``load_config``."""
    data, problems = parse_yaml(text, source)
    if data is None:
        raise ConfigError(source, problems)
    top = Fields(data, "", problems, os.environ if env is None else env)
    config = _build(top, source)
    top.finish(allowed=_TOP_KEYS)
    if problems:
        raise ConfigError(source, problems)
    return config


def _build(top: Fields, source: str) -> Config:
    listen = top.get("listen", Listen.parse, Listen(), what="host:port")
    instance = top.mapping("instance")
    instance_id = "skyroute"
    if instance is not None:
        instance_id = instance.text("id", "skyroute") or "skyroute"
        instance.finish()
    api_keys = _auth(top)
    admin_key = None
    admin = top.mapping("admin")
    if admin is not None:
        admin_key = admin.text("key") or None
        admin.finish()
    limits = section(top, "limits", Limits, {
        "max_body_bytes": ("max_body_bytes", parse_size, "a size like 16MiB"),
        "head_timeout": ("head_timeout_s", parse_duration, DURATION),
        "body_timeout": ("body_timeout_s", parse_duration, DURATION),
        "keepalive_timeout": ("keepalive_timeout_s", parse_duration, DURATION),
        "max_client_connections": ("max_client_connections", parse_count, COUNT)})
    retry, breaker = read_retry(top), read_breaker(top)
    latency = read_latency(top)
    sessions = read_sessions(top)
    sync = read_sync(top)
    upstreams = _upstreams(top)
    routes = _routes(top, upstreams)
    return Config(listen=listen, instance_id=instance_id, api_keys=api_keys,
                  admin_key=admin_key, limits=limits, retry=retry, breaker=breaker,
                  latency=latency, sessions=sessions, sync=sync, upstreams=upstreams,
                  routes=routes, degradation=read_degradation(top), source=source)


def _hedge_after(value: Any) -> float | str:
    return "p95" if str(value).strip() == "p95" else parse_duration(value)


def _auth(top: Fields) -> tuple[ApiKey, ...] | None:
    auth = top.mapping("auth")
    if auth is None:
        return None
    keys = []
    for path, line, item in auth.items("api_keys"):
        entry = auth.child(path, line, item)
        if entry is None:
            continue
        name = entry.text("name", required=True)
        key = entry.text("key", required=True)
        rpm = entry.get("rpm", parse_count, None, what="requests per minute, e.g. 60")
        tpm = entry.get("tpm", parse_count, None, what="tokens per minute, e.g. 100000")
        max_concurrent = entry.get("max_concurrent", parse_count, None,
                                   what="requests in flight at once, e.g. 16")
        entry.finish()
        if name and key:
            keys.append(ApiKey(name=name, key=key, rpm=rpm, tpm=tpm,
                               max_concurrent=max_concurrent))
        elif key == "" and "${" not in str(entry.data.get("key")):
            entry.problem("key", "is empty; a client key must not be blank")
    auth.finish()
    return tuple(keys)


def _upstreams(top: Fields) -> tuple[Upstream, ...]:
    result: list[Upstream] = []
    items = top.items("upstreams")
    if not items and "upstreams" not in top.data:
        top.problem(None, "missing required key 'upstreams' (at least one upstream to send to)")
    for path, line, item in items:
        entry = top.child(path, line, item)
        if entry is None:
            continue
        upstream = _upstream(entry)
        if upstream is None:
            continue
        if any(u.name == upstream.name for u in result):
            entry.problem("name", f"upstream name '{upstream.name}' is used twice")
        result.append(upstream)
    return tuple(result)


def _upstream(entry: Fields) -> Upstream | None:
    name = entry.text("name", required=True)
    url = entry.text("url")
    endpoints = [e for _, _, e in entry.items("endpoints") if isinstance(e, str)]
    if url and endpoints:
        entry.problem("endpoints", "give either 'url' or 'endpoints', not both")
    if url:
        endpoints = [url]
    api_key = entry.text("api_key")
    region = entry.text("region", "default") or "default"
    models: dict[str, str] = {}
    models_fields = entry.mapping("models")
    if models_fields is not None:
        for alias in list(models_fields.data):
            target = models_fields.text(str(alias))
            if target:
                models[str(alias)] = target
    kwargs = keywords(entry, {
        "first_token_timeout": ("first_token_timeout_s", parse_duration, DURATION),
        "connect_timeout": ("connect_timeout_s", parse_duration, DURATION),
        "idle_timeout": ("idle_timeout_s", parse_duration, DURATION),
        "max_connections": ("max_connections", parse_count, COUNT),
        "pool_timeout": ("pool_timeout_s", parse_duration, DURATION),
        "weight": ("weight", parse_count, COUNT),
        "scrape": ("scrape", parse_bool, "true or false (for a pool)")})
    entry.finish()
    if not name:
        return None
    try:
        return Upstream(name=name, endpoints=tuple(endpoints), api_key=api_key or None,
                        region=region, models=models, **kwargs)
    except ValueError as exc:
        entry.problem("url" if url else "endpoints", str(exc))
        return None


def _routes(top: Fields, upstreams: tuple[Upstream, ...]) -> tuple[Route, ...]:
    names = {u.name for u in upstreams}
    routes: list[Route] = []
    written: list[tuple[Fields, Route]] = []  # for fallback checks, which need every route
    for path, line, item in top.items("routes"):
        entry = top.child(path, line, item)
        if entry is None:
            continue
        route = _route(entry, upstreams, names)
        if route is None:
            continue
        if any(r.model == route.model for r in routes):
            entry.problem("model", f"model '{route.model}' has two routes; merge their targets")
        routes.append(route)
        written.append((entry, route))
    # An alias offered by upstreams but named by no route goes to every upstream
    # that offers it, in file order.
    routed = {r.model for r in routes}
    for upstream in upstreams:
        for alias in upstream.models:
            if alias not in routed:
                routed.add(alias)
                offering = tuple(u.name for u in upstreams if alias in u.models)
                routes.append(Route(model=alias, targets=offering, implicit=True))
    _check_fallbacks(written, routes)
    return tuple(routes)


def _check_fallbacks(written: list[tuple[Fields, Route]], routes: list[Route]) -> None:
    """Each ``fallback_model`` names another route, and following them never loops."""
    by_model = {r.model: r for r in routes}
    for entry, route in written:
        name = route.fallback_model
        if name is None:
            continue
        if name == route.model:
            entry.problem("fallback_model",
                          f"'{name}' is this route's own model; name another route's model, "
                          "e.g. a small model on the local pool")
            continue
        if name not in by_model:
            close = difflib.get_close_matches(name, sorted(by_model), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            entry.problem("fallback_model", f"'{name}' names no route{hint} "
                                            f"(models: {', '.join(sorted(by_model))})")
            continue
        chain = [route.model, name]
        while (after := by_model[chain[-1]].fallback_model) in by_model \
                and after not in chain[1:]:
            chain.append(after)
            if after == route.model:
                entry.problem("fallback_model",
                              f"fallbacks loop: {' -> '.join(chain)}; the last route of a "
                              "chain must have no fallback_model")
                break


def _route(entry: Fields, upstreams: tuple[Upstream, ...], names: set[str]) -> Route | None:
    model = entry.text("model", required=True)
    targets: list[str] = []
    for path, line, target in entry.items("targets"):
        if not isinstance(target, str) or target not in names:
            known = ", ".join(sorted(names)) or "none defined"
            entry.problems.append(ConfigProblem(
                path, line, f"target {target!r} names no upstream (upstreams: {known})"))
            continue
        upstream = next(u for u in upstreams if u.name == target)
        if model and upstream.models and model not in upstream.models:
            entry.problems.append(ConfigProblem(
                path, line,
                f"upstream '{target}' has no model for alias '{model}'; add "
                f"'{model}: <its model name>' to its models"))
        targets.append(target)
    if "targets" not in entry.data:
        entry.problem(None, "missing required key 'targets' (upstream names, in preference order)")
    kwargs = keywords(entry, {
        "latency_threshold": ("latency_threshold_s", parse_duration, DURATION),
        "timeout": ("timeout_s", parse_duration, DURATION),
        "max_attempts": ("max_attempts", parse_count, COUNT),
        "hedge_after": ("hedge_after", _hedge_after, "a duration like 2s, or p95"),
        "resume": ("resume", parse_bool, "true or false"),
        "essential": ("essential", parse_bool, "true or false"),
        "fallback_model": ("fallback_model", str, "another route's model alias")})
    strategy = entry.text("strategy")
    if strategy is not None:
        if strategy not in STRATEGIES:
            close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            entry.problem("strategy",
                          f"'{strategy}' is not one of {', '.join(STRATEGIES)}{hint}")
        else:
            kwargs["strategy"] = Strategy(strategy)
    entry.finish()
    if not model or not targets:
        return None
    return Route(model=model, targets=tuple(targets), **kwargs)
