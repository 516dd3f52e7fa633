"""Durable jobs in the application: the service, its lifecycle and its routes, in one call."""

from __future__ import annotations

from aiohttp import web
from skyroute.routing import Config

from ._jobs_api import add_job_routes
from ._jobs_metrics import JobMetrics
from ._jobs_runner import JOBS, JobsService, LaneHere, count_clients, jobs_lifecycle
from ._state import METRICS
from ._workers import WorkerSpec


def install_jobs(app: web.Application, config: Config,
                 worker: WorkerSpec | None = None) -> None:
    """With a ``jobs`` section: the job store, the lane and the job API on ``app``.

    In a ``--workers`` process the lane runs only where the supervisor says so: in the
    jobs worker when there is one (``jobs.lane.process: separate``), else in every worker.
    The section is read once, at start: a reload that adds, removes or moves it
    (``data_dir``, ``redis``, ``lane.process``) takes effect at the next start.
    """
    if config.jobs is None:
        return
    if worker is None or worker.wake_fd is None:
        lane = LaneHere.INLINE
    else:
        lane = LaneHere.SEPARATE if worker.runs_jobs else LaneHere.ELSEWHERE
    app[JOBS] = JobsService(config.jobs, metrics=JobMetrics(app[METRICS].registry), lane=lane,
                            wake_fd=None if worker is None else worker.wake_fd)
    app.cleanup_ctx.append(jobs_lifecycle)
    if lane is LaneHere.INLINE:  # the share counts this process's clients
        app.middlewares.append(count_clients)
    add_job_routes(app)
