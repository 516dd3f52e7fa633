"""Prometheus metrics of the job queue and its lane, on the instance's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ._metrics import LATENCY_BUCKETS


class JobMetrics:
    """Jobs (async requests and batch lines) by state, tries, retries and the lane."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.accepted = Counter(
            "skyroute_jobs_accepted", "Jobs accepted: async requests, batch lines and batches.",
            ["kind"], registry=r)
        self.finished = Counter(
            "skyroute_jobs_finished", "Jobs finished, by kind (async, line) and result "
            "(completed: a 2xx answer; failed: anything else, after retries).",
            ["kind", "result"], registry=r)
        self.retries = Counter(
            "skyroute_jobs_retries", "Job tries that will be retried after a backoff.",
            ["kind"], registry=r)
        self.jobs = Gauge(
            "skyroute_jobs", "Jobs in the queue by state (queued, running), as the store "
            "holds them (finished ones: skyroute_jobs_finished).", ["state"],
            multiprocess_mode="livemax", registry=r)
        self.queue_age = Gauge(
            "skyroute_jobs_queue_age_seconds", "Age of the oldest queued job.",
            multiprocess_mode="livemax", registry=r)
        self.lane_window = Gauge(
            "skyroute_jobs_lane_window", "Jobs this instance may run at once now (AIMD).",
            multiprocess_mode="livesum", registry=r)
        self.lane_slowdowns = Counter(
            "skyroute_jobs_lane_slowdowns", "Times the lane halved its window, by reason "
            "(busy: an upstream said busy; degraded: a route at reduced or worse).",
            ["reason"], registry=r)
        self.lane_share = Gauge(
            "skyroute_jobs_lane_share", "Jobs the lane may run while clients are served "
            "(AIMD on this process's CPU and event-loop lag); equals the window when no "
            "client is.", multiprocess_mode="livesum", registry=r)
        self.lane_yields = Counter(
            "skyroute_jobs_lane_yields", "Ticks (20 ms) in which the lane shrank its share "
            "to leave the CPU to clients.", registry=r)
        self.claimed = Counter(
            "skyroute_jobs_claimed", "Jobs this instance claimed from the queue, by how "
            "(claim: the lane asked for them; refill: the store call that ended a job took "
            "the one for its slot, no round trip of its own).", ["how"], registry=r)
        self.try_seconds = Histogram(
            "skyroute_jobs_try_seconds", "Time one try of a job took.", ["kind"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.batches = Counter(
            "skyroute_batches_finished", "Batches that ended, by status.", ["status"],
            registry=r)
        self.webhooks = Counter(
            "skyroute_jobs_webhooks",
            "Webhook deliveries by result (delivered, retry, failed; refused: the target or "
            "the address its host resolved to is not allowed by jobs.webhook_hosts; "
            "unresolved: its host no longer resolves). refused and unresolved are not retried.",
            ["result"], registry=r)
