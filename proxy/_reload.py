"""Live reload of the routing file: a file watch plus an explicit trigger (SIGHUP).

A valid edit swaps in a new ``Runtime``; requests in flight keep the one they
started with. An invalid edit is refused: every problem is logged with its field
and line, the running config keeps serving, and
``skyroute_config_reloads_total{result="error"}`` counts it. Kubernetes updates a
mounted ConfigMap by swapping a symlink, so the watch compares what ``stat``
finds through the path (inode included) and then the content itself.

Reading and validating run in a worker thread, never on the event loop, so a big or
hostile file cannot stall serving. One loop does every reload (SIGHUP only wakes it),
so reloads never overlap, and it survives any exception: it logs it and keeps watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog
from aiohttp import web
from skyroute.routing import MAX_CONFIG_BYTES, ConfigError

from ._cache import CACHE
from ._config_file import load_config
from ._state import METRICS, SERVING
from ._tasks import running

log = structlog.get_logger("skyroute.config")

#: Set to reload at once (SIGHUP), whatever the file's fingerprint says.
RELOAD_NOW = web.AppKey("reload_now", asyncio.Event)


async def reload_config(app: web.Application) -> bool:
    """Load the routing file again (in a worker thread) and serve it if valid.

    Returns:
        True if the new config was applied.
    """
    serving = app[SERVING]
    path = serving.config_path
    if path is None:
        return False
    old = serving.runtime.config
    try:
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        app[METRICS].config_reloads.labels("error").inc()
        for problem in exc.problems:
            log.error("config_reload_refused", file=str(path), line=problem.line,
                      field=problem.path, problem=problem.message)
        return False
    if config.listen != old.listen:
        log.warning("listen_change_ignored", file=str(path),
                    serving=f"{old.listen.host}:{old.listen.port}",
                    wanted=f"{config.listen.host}:{config.listen.port}")
    serving.swap(config)
    if CACHE in app:  # a changed cache section: the new one now, the old one closes when idle
        app[CACHE].for_policy(config.cache)
    app[METRICS].config_reloads.labels("success").inc()
    log.info("config_reloaded", file=str(path), routes=len(config.routes),
             upstreams=len(config.upstreams))
    return True


def request_reload(app: web.Application) -> None:
    """Reload the routing file now (the SIGHUP handler); the watch loop does it."""
    if RELOAD_NOW in app:
        app[RELOAD_NOW].set()


def _fingerprint(path: Path) -> tuple[int, int, int, bytes] | None:
    try:
        st = os.stat(path)
        with path.open("rb") as file:  # no more than load_config would read
            digest = hashlib.sha256(file.read(MAX_CONFIG_BYTES + 1)).digest()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, digest


def config_watcher(interval_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that reloads the routing file whenever its content changes."""

    async def watch(app: web.Application) -> AsyncIterator[None]:
        path = app[SERVING].config_path
        assert path is not None
        wake = app[RELOAD_NOW] = asyncio.Event()
        seen = await asyncio.to_thread(_fingerprint, path)

        async def loop() -> None:
            nonlocal seen
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await wake.wait()
                forced = wake.is_set()
                wake.clear()
                try:
                    current = await asyncio.to_thread(_fingerprint, path)
                    if not forced and (current is None or current == seen):
                        continue
                    if not forced and seen is not None and current is not None \
                            and current[3] == seen[3]:
                        seen = current  # touched, or symlink swapped to the same content
                        continue
                    seen = current
                    await reload_config(app)
                except Exception:  # the watch must outlive any bug: log it, keep watching
                    app[METRICS].config_reloads.labels("error").inc()
                    # Still serving the previous config, and still watching the file.
                    log.exception("config_reload_crashed", file=str(path))

        async with running(loop(), name="skyroute-config-watch"):
            yield

    return watch
