"""Durable jobs in the application: the service, its lifecycle and its routes, in one call."""

from __future__ import annotations

from aiohttp import web
from skyroute.routing import Config

from ._jobs_api import add_job_routes
from ._jobs_metrics import JobMetrics
from ._jobs_runner import JOBS, JobsService, count_clients, jobs_lifecycle
from ._state import METRICS


def install_jobs(app: web.Application, config: Config) -> None:
    """With a ``jobs`` section: the job store, the lane and the job API on ``app``.

    The section is read once, at start: a reload that adds, removes or moves it
    (``data_dir``, ``redis``) takes effect at the next start.
    """
    if config.jobs is None:
        return
    app[JOBS] = JobsService(config.jobs, metrics=JobMetrics(app[METRICS].registry))
    app.cleanup_ctx.append(jobs_lifecycle)
    app.middlewares.append(count_clients)
    add_job_routes(app)
