"""The ``jobs:`` section of the routing file: durable asynchronous work.

Declared apart from ``_policies`` (one section, one module) in the same way: a
frozen pydantic dataclass whose fields give validation, the JSON Schema, the Helm
chart's schema and the README's settings table. Without a ``jobs`` section
skyroute runs no queue: ``/v1/async/*`` answers 404 and ``/v1/files`` and
``/v1/batches`` pass through to an upstream as before.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from ._values import SECTION, Count, Duration, Name, RedisUrl, Share, Text, invalid

__all__ = ["BatchMode", "JobsLane", "JobsPolicy", "JobsRedis", "LaneProcess"]


class BatchMode(enum.StrEnum):
    """Who runs ``/v1/batches`` (``jobs.batches``)."""

    #: skyroute stores the files and runs every line through its own routing.
    LOCAL = "local"
    #: The upstream's own Batch API (its discount), as without a ``jobs`` section.
    PASSTHROUGH = "passthrough"


class LaneProcess(enum.StrEnum):
    """Where ``skyroute run`` runs the lane (``jobs.lane.process``)."""

    #: ``separate`` with a Redis queue, ``inline`` with SQLite (``JobsPolicy.lane_process``).
    AUTO = "auto"
    #: A jobs process of its own beside the serving workers, at the kernel's idle CPU
    #: priority (Linux ``SCHED_IDLE``): it runs only on CPU time they leave unused.
    SEPARATE = "separate"
    #: In every serving worker's event loop, yielding to clients by ``cpu``/``loop_lag``.
    INLINE = "inline"


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class JobsRedis:
    """A job queue in Redis (Streams with a consumer group), shared by every instance."""

    url: RedisUrl = Field(
        description="The Redis server, e.g. redis://redis:6379/0 (rediss:// for TLS).")
    prefix: Name = Field(
        default="skyroute:jobs:",
        description="Key prefix of the queue's stream and job records in Redis.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class JobsLane:
    """Where the lane runs, and how it yields to clients while they are served.

    ``process: separate``: ``skyroute run`` starts one jobs process beside its serving
    workers, at the kernel's idle CPU priority; the kernel hands the core to a serving
    worker the moment it has work, which no event loop can do for a job's callback already
    running. ``process: inline`` runs the lane in each serving worker (``routing.LaneShare``;
    one process, as a ``Server`` embedded in a program always does). ``auto`` (the
    default) is ``separate`` with a Redis queue and ``inline`` with SQLite, whose write lock
    is shared by every process: held by a jobs worker the kernel has set aside, it would
    keep a serving worker's submit waiting for as long as the serving workers keep the
    cores busy. Inline, every 20 ms the lane's share of jobs is halved while this process
    uses more CPU than ``cpu`` or its event loop runs ``loop_lag`` late, and grows by one
    otherwise; with no client for 5 ticks in a row it gets its whole window back.
    bench/jobs.py (200 client requests/s beside a draining batch): 0.5 and 5 ms raised the
    clients' p99 1.2-3.2x; 0.4 and 1 ms kept it within 10 % in most runs.
    """

    process: LaneProcess = Field(
        default=LaneProcess.AUTO,
        description="separate: skyroute run starts a jobs process of its own at idle CPU "
                    "priority (SCHED_IDLE), which runs only on CPU the serving workers leave; "
                    "inline: the lane runs in every serving worker, yielding by cpu and "
                    "loop_lag; auto: separate with jobs.redis, inline with SQLite (whose write "
                    "lock an idle-priority process must not hold while serving waits).")
    cpu: Share = Field(
        default=0.4,
        description="process: inline only. While clients are served, the lane keeps its "
                    "worker's CPU use under this share of one core (20% or 0.2); higher drains "
                    "faster beside them, at the clients' latency.")
    loop_lag_s: Duration = Field(
        default=0.001, validation_alias="loop_lag", gt=0,
        description="process: inline only. While clients are served, the lane halves its "
                    "share when the event loop runs this late (averaged); a client's request "
                    "waits about as long.")
    trickle_s: Duration = Field(
        default=1.0, validation_alias="trickle", gt=0,
        description="process: inline only. While the lane has yielded everything, one job "
                    "still starts this often, so a queue under constant client traffic moves.")

    @model_validator(mode="after")
    def _some_cpu(self) -> JobsLane:
        if self.cpu <= 0:
            raise invalid("cpu must be above 0: the lane would never run beside clients; "
                          "write a share such as 40% (0.4)")
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class JobsPolicy:
    """Async requests and the Batch API, run by skyroute from a durable queue."""

    data_dir: Text = Field(
        default="./skyroute-data",
        description="Where the SQLite queue and uploaded files live (a volume in Kubernetes); "
                    "every instance sharing it must run on one host.")
    redis: JobsRedis | None = Field(
        default=None,
        description="A queue shared by every instance that names it; without it the queue is "
                    "SQLite under data_dir.")
    max_retries: int = Field(
        default=5, ge=0, le=100,
        description="Retries of a failed request (5xx, 429, no answer) before it goes to the "
                    "error file; a 4xx answer is never retried.")
    concurrency: Count = Field(
        default=16,
        description="Jobs run at once per instance, in the low-priority lane (the most; the "
                    "lane halves it while upstreams are busy).")
    lane: JobsLane = Field(
        default_factory=JobsLane,
        description="How the lane yields to clients while they are served: its CPU share, "
                    "the event-loop lag it tolerates, its trickle.")
    batches: BatchMode = Field(
        default=BatchMode.LOCAL,
        description="local: skyroute stores files and runs /v1/batches itself; passthrough: the "
                    "upstream's own Batch API.")
    backoff_base_s: Duration = Field(
        default=1.0, validation_alias="backoff_base", gt=0,
        description="Ceiling of the first retry delay; retry n waits up to base * 2**n (full "
                    "jitter), longer if the upstream's Retry-After says so.")
    backoff_cap_s: Duration = Field(
        default=300.0, validation_alias="backoff_cap", gt=0,
        description="Largest retry delay ceiling.")
    visibility_timeout_s: Duration = Field(
        default=30.0, validation_alias="visibility_timeout", gt=0,
        description="A job whose instance stopped renewing its claim for this long (it died) "
                    "is run by another.")
    retention_s: Duration = Field(
        default=30 * 86400.0, validation_alias="retention", gt=0,
        description="Finished async jobs, and ended batches with their output and error files, "
                    "are deleted this long after they ended (OpenAI keeps batch output 30 days).")
    targets: Mapping[str, Annotated[tuple[Name, ...], Field(min_length=1)]] = Field(
        default_factory=lambda: MappingProxyType({}),
        description="Model alias -> upstreams its jobs try first, in preference order (e.g. "
                    "the local GPU pool); interactive requests keep the route's targets. When "
                    "none of them is available, jobs go to the route's own targets.")
    webhook_secret: Text | None = Field(
        default=None, repr=False,
        description="Signs completion webhooks (Standard Webhooks, HMAC-SHA256); write it as "
                    "${ENV_NAME}. Unset: requests asking for a webhook are refused.")
    webhook_hosts: tuple[str, ...] = Field(
        default=(),
        description="Where webhooks may go: host names (a leading *. matches subdomains) and IP "
                    "addresses or CIDR ranges. A named host must resolve to public addresses; a "
                    "private, loopback or link-local one is reached only if an address entry "
                    "covers it. '*' allows any public host. Empty: requests asking for a webhook "
                    "are refused.")

    @model_validator(mode="after")
    def _base_within_cap(self) -> JobsPolicy:
        if self.backoff_base_s > self.backoff_cap_s:
            raise invalid("backoff_base must not be above backoff_cap")
        object.__setattr__(self, "webhook_secret", self.webhook_secret or None)
        object.__setattr__(self, "targets", MappingProxyType(dict(self.targets)))
        for entry in self.webhook_hosts:
            if _network(entry) is None and not _HOST_PATTERN.fullmatch(entry):
                raise invalid(f"webhook_hosts entry {entry!r} is neither a host name (such as "
                              "hooks.example.com or *.example.com) nor an IP address or CIDR "
                              "range (such as 10.1.0.0/16)")
        return self

    @property
    def lane_process(self) -> LaneProcess:
        """Where ``skyroute run`` runs the lane, ``auto`` decided (``JobsLane``)."""
        if self.lane.process is not LaneProcess.AUTO:
            return self.lane.process
        return LaneProcess.SEPARATE if self.redis is not None else LaneProcess.INLINE

    def webhook_host_allowed(self, host: str) -> bool:
        """Whether ``webhook_hosts`` lets a webhook URL name ``host`` (a name or an IP).

        An IP literal needs an address entry covering it, or ``*`` and a public address.
        """
        host = host.lower().rstrip(".")
        ip = _address(host)
        if ip is not None:
            return self._covers(ip) or ("*" in self.webhook_hosts and _public(ip))
        return any(fnmatch.fnmatchcase(host, entry.lower()) for entry in self.webhook_hosts
                   if _network(entry) is None)

    def webhook_address_allowed(self, address: str) -> bool:
        """Whether a webhook may connect to ``address``, the IP its host resolved to.

        A public address is fine once the host is allowed; any other (private, loopback,
        link-local, reserved) only inside an address entry, so a name that resolves, or
        is rebound, to an internal service is still refused.
        """
        ip = _address(address)
        return ip is not None and (self._covers(ip) or _public(ip))

    def _covers(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        networks = (n for n in map(_network, self.webhook_hosts) if n is not None)
        return any(_unmapped(ip) in network for network in networks)


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``::ffff:127.0.0.1`` is 127.0.0.1: judged as the IPv4 address it reaches."""
    return getattr(ip, "ipv4_mapped", None) or ip


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    ip = _unmapped(ip)
    return ip.is_global and not ip.is_multicast


#: A host name in webhook_hosts, maybe with a leading ``*.`` for its subdomains (``*``: any).
_HOST_PATTERN = re.compile(r"\*|(\*\.)?([a-z0-9-]+\.)*[a-z0-9-]+", re.IGNORECASE)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None
