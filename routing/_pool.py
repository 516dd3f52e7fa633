"""Endpoint picking inside a local GPU model pool (vLLM, SGLang, TGI, Ollama).

Rules / Theory of operation
---------------------------
Modelled on the Kubernetes Gateway API Inference Extension's endpoint picker:
the model servers publish their own load on ``/metrics``, and the best replica
is the one with an empty queue, then the least KV-cache in use, then the fewest
requests running. The proxy scrapes and health-checks; this module only judges.

Inputs (all plain calls, no I/O):
  * ``parse_server_load(text)`` turns a Prometheus text exposition into a
    ``ServerLoad`` (``None`` when the server exports none of the metrics,
    e.g. Ollama). For each quantity the first name of ``PoolMetricNames`` that
    appears wins, so a vLLM exporting both the new ``kv_cache_usage_perc`` and
    the old ``gpu_cache_usage_perc`` is not counted twice. Counts are summed
    over label sets (one per model or engine); the KV-cache share takes the
    *maximum*, because a sum of fractions is meaningless and the fullest
    engine is the one that will start evicting.
  * ``on_health(endpoint, ok)``: active checks. An endpoint is unhealthy after
    ``fail_threshold`` failed checks in a row, healthy again after one good
    one. Endpoints start healthy, so a pool works before its first check.
  * ``on_load(endpoint, load)``: a scrape. It is fresh for ``stale_after_s``.
  * ``on_request_start`` / ``on_request_end``: skyroute's own in-flight count.

``pick`` ranks the healthy endpoints by a cost, lowest first::

    cost = w.waiting  * waiting / max_waiting     (over the candidates)
         + w.kv_cache * kv_cache_usage            (already 0..1)
         + w.running  * running / max_running

With fresh metrics, ``running`` is the scraped count plus requests skyroute
started since that scrape, so picks between two scrapes do not all herd onto
the replica that looked idlest. Without fresh metrics (stale, or a server with
no metrics) ``running`` is skyroute's own in-flight count, ``waiting`` is 0 and
the KV share is the mean of the others' (so being blind is neither a bonus
nor a penalty). Equal costs are broken round-robin: the search starts just
after the last endpoint picked. If no endpoint is healthy, ``pick`` still
answers with the least bad one (fewest failed checks, then cost): refusing is
the caller's decision, not the picker's.

Unknown endpoint names, and ending a request that never started, raise
``RoutingStateError`` and change nothing. A config reload that changes the pool
builds a new picker, which ``take_over``s the in-flight and pick counts of the
endpoints it keeps, so requests in flight end where they were counted; health
and loads start afresh and the next scrape refills them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

import pydantic
import pydantic.dataclasses
from prometheus_client.parser import text_string_to_metric_families

from ._errors import RoutingStateError
from ._values import SECTION, MetricName

__all__ = [
    "DEFAULT_METRIC_NAMES",
    "EndpointPicker",
    "EndpointView",
    "PickWeights",
    "PoolMetricNames",
    "ServerLoad",
    "parse_server_load",
]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class PoolMetricNames:
    """Prometheus names for each load quantity, in order of preference
    (``latency.scrape.metrics`` in the routing file)."""

    waiting: tuple[MetricName, ...] = pydantic.Field(default=(
        "vllm:num_requests_waiting",
        "sglang:num_queue_reqs",
        "tgi_queue_size",
    ), description="Requests queued on a server.")
    running: tuple[MetricName, ...] = pydantic.Field(default=(
        "vllm:num_requests_running",
        "sglang:num_running_reqs",
        "tgi_batch_current_size",
    ), description="Requests a server is running.")
    kv_cache_usage: tuple[MetricName, ...] = pydantic.Field(default=(
        "vllm:kv_cache_usage_perc",  # vLLM >= 0.10, a fraction despite the name
        "vllm:gpu_cache_usage_perc",  # older vLLM
        "sglang:token_usage",
    ), description="The share of a server's KV cache in use (0..1).")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLoad:
    """One server's load as it reported it."""

    waiting: int
    running: int
    kv_cache_usage: float | None  # 0..1; None if the server does not say


@dataclass(frozen=True, slots=True, kw_only=True)
class PickWeights:
    """How much each load quantity counts in an endpoint's cost."""

    waiting: float = 4.0
    kv_cache: float = 2.0
    running: float = 1.0


def _first_present(values: dict[str, list[float]], names: tuple[str, ...]) -> list[float] | None:
    for name in names:
        if name in values:
            return values[name]
    return None


# The defaults: vLLM, SGLang and TGI names together. Frozen, so safe to share.
DEFAULT_METRIC_NAMES = PoolMetricNames()


def parse_server_load(
    text: str, names: PoolMetricNames = DEFAULT_METRIC_NAMES
) -> ServerLoad | None:
    """Read a model server's load from its Prometheus text exposition.

    Args:
        text: the body of the server's ``/metrics`` response.
        names: which metric names to look for; the default covers vLLM,
            SGLang and TGI.

    Returns:
        The load, with counts summed over label sets and the KV-cache share
        the largest over label sets; missing counts are 0. ``None`` if the
        text has none of the metrics (Ollama, or not a model server).

    Raises:
        ValueError: if a line of one of the wanted metrics is not valid
            Prometheus exposition. Other lines are not parsed at all: a vLLM
            exposition is mostly histograms, and this runs every second.
    """
    wanted = {*names.waiting, *names.running, *names.kv_cache_usage}
    lines = [line for line in map(str.strip, text.splitlines())
             if line.split("{", 1)[0].split(" ", 1)[0] in wanted]
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name in wanted and not math.isnan(sample.value):
                values.setdefault(sample.name, []).append(float(sample.value))
    if not values:
        return None
    waiting = _first_present(values, names.waiting) or []
    running = _first_present(values, names.running) or []
    kv = _first_present(values, names.kv_cache_usage)
    return ServerLoad(
        waiting=max(0, round(sum(waiting))),
        running=max(0, round(sum(running))),
        kv_cache_usage=None if kv is None else min(1.0, max(0.0, *kv)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointView:
    """What the picker knows about one endpoint, for /admin."""

    endpoint: str
    healthy: bool
    failed_checks: int
    in_flight: int
    picks: int  # requests sent there since it joined the pool
    load: ServerLoad | None
    load_age_s: float | None
    fresh: bool
    cost: float | None  # None when it is not a candidate for pick()


@final
class _Endpoint:
    __slots__ = ("failed_checks", "healthy", "in_flight", "load", "load_at", "picks",
                 "since_load")

    def __init__(self) -> None:
        self.healthy = True
        self.failed_checks = 0
        self.in_flight = 0
        self.picks = 0
        self.since_load = 0  # requests started since the last scrape
        self.load: ServerLoad | None = None
        self.load_at: float | None = None


@final
class EndpointPicker:
    """Chooses the replica of a local pool that should take the next request."""

    __slots__ = ("_cursor", "_endpoints", "_order", "fail_threshold", "stale_after_s", "weights")

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        stale_after_s: float = 10.0,
        fail_threshold: int = 2,
        weights: PickWeights = PickWeights(),  # frozen, so safe to share
    ) -> None:
        """Create a picker in which every endpoint is healthy and idle.

        Args:
            endpoints: the pool's endpoint names (e.g. base URLs), distinct.
            stale_after_s: age after which a scraped load is ignored.
            fail_threshold: failed checks in a row that make one unhealthy.
            weights: the cost weights.

        Raises:
            ValueError: if there are no endpoints, duplicates, or a bad number.
        """
        if not endpoints:
            raise ValueError("EndpointPicker needs at least one endpoint")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"EndpointPicker: duplicate endpoints in {list(endpoints)!r}")
        if not (math.isfinite(stale_after_s) and stale_after_s > 0):
            raise ValueError(f"stale_after_s must be a finite number > 0, got {stale_after_s!r}")
        if fail_threshold < 1:
            raise ValueError(f"fail_threshold must be >= 1, got {fail_threshold!r}")
        self._order = tuple(endpoints)
        self._endpoints = {name: _Endpoint() for name in self._order}
        self._cursor = 0
        self.stale_after_s = stale_after_s
        self.fail_threshold = fail_threshold
        self.weights = weights

    def _get(self, endpoint: str, call: str) -> _Endpoint:
        try:
            return self._endpoints[endpoint]
        except KeyError:
            raise RoutingStateError(f"{call}: {endpoint!r} is not in this pool") from None

    def on_health(self, endpoint: str, ok: bool, *, now: float) -> None:
        """Take the result of one active health check.

        Args:
            endpoint: which endpoint was checked.
            ok: whether the check passed.
            now: when (kept for symmetry; checks are counted, not timed).

        Raises:
            RoutingStateError: if ``endpoint`` is not in the pool.
        """
        ep = self._get(endpoint, "on_health()")
        ep.failed_checks = 0 if ok else ep.failed_checks + 1
        ep.healthy = ep.failed_checks < self.fail_threshold

    def on_load(self, endpoint: str, load: ServerLoad | None, *, now: float) -> None:
        """Take one scrape of an endpoint's metrics.

        Args:
            endpoint: which endpoint was scraped.
            load: what ``parse_server_load`` found, ``None`` for nothing.
            now: when the scrape was taken.

        Raises:
            RoutingStateError: if ``endpoint`` is not in the pool.
        """
        ep = self._get(endpoint, "on_load()")
        ep.load, ep.load_at, ep.since_load = load, now, 0

    def on_request_start(self, endpoint: str) -> None:
        """Count one request skyroute sent to ``endpoint``.

        Raises:
            RoutingStateError: if ``endpoint`` is not in the pool.
        """
        ep = self._get(endpoint, "on_request_start()")
        ep.in_flight += 1
        ep.picks += 1
        ep.since_load += 1

    def on_request_end(self, endpoint: str) -> None:
        """Count one request to ``endpoint`` as finished, however it ended.

        Raises:
            RoutingStateError: if ``endpoint`` is not in the pool or has no
                request in flight; nothing changes.
        """
        ep = self._get(endpoint, "on_request_end()")
        if ep.in_flight == 0:
            raise RoutingStateError(f"on_request_end(): {endpoint!r} has no request in flight")
        ep.in_flight -= 1
        ep.since_load = max(0, ep.since_load - 1)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The pool's endpoint names, in pool order."""
        return self._order

    def take_over(self, old: EndpointPicker) -> None:
        """Carry ``old``'s request counts over, for the endpoints both pools have.

        Called on a new picker built by a config reload, before it is used, so
        that requests still in flight end against a count that includes them.
        """
        for name, ep in self._endpoints.items():
            previous = old._endpoints.get(name)
            if previous is not None:
                ep.in_flight, ep.picks = previous.in_flight, previous.picks

    def is_healthy(self, endpoint: str) -> bool:
        """Whether ``endpoint`` passes its health checks (unknown: False)."""
        ep = self._endpoints.get(endpoint)
        return ep is not None and ep.healthy

    def _is_fresh(self, ep: _Endpoint, now: float) -> bool:
        return (
            ep.load is not None and ep.load_at is not None and now - ep.load_at < self.stale_after_s
        )

    def _candidates(self) -> list[str]:
        healthy = [n for n in self._order if self._endpoints[n].healthy]
        if healthy:
            return healthy
        fewest = min(self._endpoints[n].failed_checks for n in self._order)
        return [n for n in self._order if self._endpoints[n].failed_checks == fewest]

    def _costs(self, names: list[str], now: float) -> dict[str, float]:
        estimates: dict[str, tuple[int, int, float | None]] = {}
        for name in names:
            ep = self._endpoints[name]
            if self._is_fresh(ep, now):
                assert ep.load is not None
                load = ep.load
                estimates[name] = (load.waiting, load.running + ep.since_load, load.kv_cache_usage)
            else:
                estimates[name] = (0, ep.in_flight, None)
        known_kv = [kv for _, _, kv in estimates.values() if kv is not None]
        mean_kv = sum(known_kv) / len(known_kv) if known_kv else 0.0
        max_waiting = max(w for w, _, _ in estimates.values()) or 1
        max_running = max(r for _, r, _ in estimates.values()) or 1
        w = self.weights
        return {
            name: round(
                w.waiting * waiting / max_waiting
                + w.kv_cache * (mean_kv if kv is None else kv)
                + w.running * running / max_running,
                9,  # so float noise never beats the round-robin tie-break
            )
            for name, (waiting, running, kv) in estimates.items()
        }

    def pick(self, *, now: float) -> str:
        """Choose the endpoint for the next request.

        Picking does not count the request: call ``on_request_start`` when it
        is sent.

        Args:
            now: the current time in seconds (decides which loads are fresh).

        Returns:
            The endpoint name; never refuses, even if all are unhealthy.
        """
        candidates = self._candidates()
        costs = self._costs(candidates, now)
        n = len(self._order)
        position = {name: i for i, name in enumerate(self._order)}

        def rank(name: str) -> tuple[float, int]:
            return costs[name], (position[name] - self._cursor) % n

        chosen = min(candidates, key=rank)
        self._cursor = (position[chosen] + 1) % n
        return chosen

    def snapshot(self, *, now: float) -> tuple[EndpointView, ...]:
        """Describe every endpoint, in pool order, for /admin.

        Args:
            now: the current time in seconds.

        Returns:
            One ``EndpointView`` per endpoint, with the cost ``pick`` would
            use (``None`` for endpoints it would not consider).
        """
        costs = self._costs(self._candidates(), now)
        return tuple(
            EndpointView(
                endpoint=name,
                healthy=ep.healthy,
                failed_checks=ep.failed_checks,
                in_flight=ep.in_flight,
                picks=ep.picks,
                load=ep.load,
                load_age_s=None if ep.load_at is None else now - ep.load_at,
                fresh=self._is_fresh(ep, now),
                cost=costs.get(name),
            )
            for name, ep in self._endpoints.items()
        )

    def __repr__(self) -> str:
        parts = [
            f"{name}:{'up' if ep.healthy else 'down'}/{ep.in_flight}"
            for name, ep in self._endpoints.items()
        ]
        return f"<EndpointPicker {' '.join(parts)}>"
