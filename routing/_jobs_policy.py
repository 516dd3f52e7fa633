"""The ``jobs:`` section of the routing file: durable asynchronous work.

Declared apart from ``_policies`` (one section, one module) in the same way: a
frozen pydantic dataclass whose fields give validation, the JSON Schema, the Helm
chart's schema and the README's settings table. Without a ``jobs`` section
skyroute runs no queue: ``/v1/async/*`` answers 404 and ``/v1/files`` and
``/v1/batches`` pass through to an upstream as before.
"""

from __future__ import annotations

import enum

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from ._values import SECTION, Count, Duration, Name, RedisUrl, Text, invalid

__all__ = ["BatchMode", "JobsPolicy", "JobsRedis"]


class BatchMode(enum.StrEnum):
    """Who runs ``/v1/batches`` (``jobs.batches``)."""

    #: skyroute stores the files and runs every line through its own routing.
    LOCAL = "local"
    #: The upstream's own Batch API (its discount), as without a ``jobs`` section.
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class JobsRedis:
    """A job queue in Redis (Streams with a consumer group), shared by every instance."""

    url: RedisUrl = Field(
        description="The Redis server, e.g. redis://redis:6379/0 (rediss:// for TLS).")
    prefix: Name = Field(
        default="skyroute:jobs:",
        description="Key prefix of the queue's stream and job records in Redis.")


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
    webhook_secret: Text | None = Field(
        default=None, repr=False,
        description="Signs completion webhooks (Standard Webhooks, HMAC-SHA256); write it as "
                    "${ENV_NAME}. Unset: requests asking for a webhook are refused.")

    @model_validator(mode="after")
    def _base_within_cap(self) -> JobsPolicy:
        if self.backoff_base_s > self.backoff_cap_s:
            raise invalid("backoff_base must not be above backoff_cap")
        object.__setattr__(self, "webhook_secret", self.webhook_secret or None)
        return self
