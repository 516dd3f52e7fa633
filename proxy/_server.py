"""Running skyroute as a server: sockets, signals, graceful shutdown.

``Server`` wraps aiohttp's ``AppRunner``: ``start()`` binds (port 0 picks a free
port, see ``url``), SIGHUP reloads the routing file, and ``aclose()`` drains: it
reports not-ready, stops accepting, lets requests and streams in flight finish
for up to ``grace_s``, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from skyroute.routing import Config

from ._app import build_app
from ._client_guard import (
    ConnectionGuard,
    GuardedAppRunner,
    check_connection_cap,
    raise_open_file_limit,
)
from ._logging import flush_logs
from ._reload import request_reload
from ._startup import listen_error
from ._state import METRICS, SERVING, Clock

log = structlog.get_logger("skyroute.server")

#: Long enough for most streamed answers to finish during a rolling update.
DEFAULT_GRACE_S = 30.0


class Server:
    """One skyroute instance listening on a socket."""

    def __init__(self, config: Config, *, config_path: str | Path | None = None,
                 host: str | None = None, port: int | None = None,
                 grace_s: float = DEFAULT_GRACE_S, app: web.Application | None = None,
                 sock: socket.socket | None = None, reuse_port: bool = False,
                 also_on: Sequence[socket.socket] = (), clock: Clock = time.monotonic) -> None:
        """Prepare (not yet bind) an instance serving ``config``.

        Args:
            clock: what routing reads the time from (see ``build_app``); ignored
                when ``app`` is given.
        """
        self.config_path = Path(config_path) if config_path is not None else None
        self.app = app if app is not None else build_app(config, config_path=config_path,
                                                         clock=clock)
        self.host = host if host is not None else config.listen.host
        self.port = port if port is not None else config.listen.port
        self.grace_s = grace_s
        self.guard = ConnectionGuard(lambda: self.app[SERVING].runtime.config.limits,
                                     self.app[METRICS])
        # handler_cancellation: a client that goes away cancels its handler, and so
        # the upstream request it was waiting on.
        self._runner = GuardedAppRunner(self.app, guard=self.guard, handler_cancellation=True,
                                        access_log=None, shutdown_timeout=grace_s)
        self._sweeper: asyncio.Task[None] | None = None
        self._sock = sock  # an already bound socket (its port known before start)
        if sock is not None:
            self.host, self.port = sock.getsockname()[:2]
        self._site: web.BaseSite | None = None
        # SO_REUSEPORT: worker processes (``--workers``) listen on one port.
        self._reuse_port = reuse_port
        self._also_on = tuple(also_on)  # more listening sockets (a worker's sync port)

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8080``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Start the app's background work, then listen.

        Raises:
            StartupError: the address cannot be listened on (in use, not this
                machine's, a name that does not resolve); nothing is left running.
        """
        check_connection_cap(self.app[SERVING].runtime.config.limits, raise_open_file_limit())
        try:
            await self._runner.setup()
            if self._sock is not None:
                self._site = web.SockSite(self._runner, self._sock)
                await self._site.start()
            else:
                self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True,
                                         reuse_port=self._reuse_port or None)
                await self._site.start()
            for extra in self._also_on:
                await web.SockSite(self._runner, extra).start()
        except BaseException as exc:
            # Stop what setup started (tickers, sessions, sync), so a failed start
            # leaves no task or client session behind to complain at exit.
            await self._runner.cleanup()
            if isinstance(exc, OSError):
                raise listen_error(self.host, self.port, exc) from exc
            raise
        self._sweeper = asyncio.create_task(self.guard.run(), name="skyroute-connection-guard")
        if self._sock is None:
            server = self._site._server  # aiohttp exposes no public bound-port accessor
            if self.port == 0 and server is not None and server.sockets:  # type: ignore[union-attr]
                self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.app[SERVING].url = self.url
        log.info("server_started", url=self.url)

    async def aclose(self) -> None:
        self.app[SERVING].draining = True
        await self._runner.cleanup()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def serve_forever(server: Server, *, stop: asyncio.Event | None = None,
                        on_started: Callable[[], None] | None = None) -> None:
    """Run ``server`` until SIGINT/SIGTERM; SIGHUP reloads the routing file.

    Args:
        stop: set it to drain and return, as SIGTERM does.
        on_started: called once the server listens.
    """
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: request_reload(server.app))
    await server.start()
    # What start-up built (modules, config, routes, schemas, the app) lives as long as
    # the process: out of the cyclic collector's way, so a full collection walks only
    # what serving made since. Without it, each full pass walked everything: 110-135 ms
    # with the event loop stopped, every few seconds under load (bench/jobs.py p99).
    gc.freeze()
    if on_started is not None:
        on_started()
    try:
        await stop.wait()
        log.info("shutdown_started", grace_s=server.grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await server.aclose()
        flush_logs()  # the drain's lines out now, not at the batch's timer


def run_event_loop(main: Coroutine[Any, Any, None], /) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
