"""Running skyroute as a server: sockets, signals, graceful shutdown.

``Server`` wraps aiohttp's ``AppRunner``: ``start()`` binds (port 0 picks a free
port, see ``url``), SIGHUP reloads the routing file, and ``aclose()`` drains: it
reports not-ready, stops accepting, lets requests and streams in flight finish
for up to ``grace_s``, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from skyroute.routing import Config

from ._app import build_app
from ._reload import request_reload
from ._startup import listen_error
from ._state import SERVING

log = structlog.get_logger("skyroute.server")

#: Long enough for most streamed answers to finish during a rolling update.
DEFAULT_GRACE_S = 30.0


class Server:
    """One skyroute instance listening on a socket."""

    def __init__(self, config: Config, *, config_path: str | Path | None = None,
                 host: str | None = None, port: int | None = None,
                 grace_s: float = DEFAULT_GRACE_S, app: web.Application | None = None,
                 sock: socket.socket | None = None) -> None:
        self.config_path = Path(config_path) if config_path is not None else None
        self.app = app if app is not None else build_app(config, config_path=config_path)
        self.host = host if host is not None else config.listen.host
        self.port = port if port is not None else config.listen.port
        self.grace_s = grace_s
        # handler_cancellation: a client that goes away cancels its handler, and so
        # the upstream request it was waiting on.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=grace_s)
        self._sock = sock  # an already bound socket (its port known before start)
        if sock is not None:
            self.host, self.port = sock.getsockname()[:2]
        self._site: web.BaseSite | None = None

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
        try:
            await self._runner.setup()
            if self._sock is not None:
                self._site = web.SockSite(self._runner, self._sock)
                await self._site.start()
            else:
                self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
                await self._site.start()
        except BaseException as exc:
            # Stop what setup started (tickers, sessions, sync), so a failed start
            # leaves no task or client session behind to complain at exit.
            await self._runner.cleanup()
            if isinstance(exc, OSError):
                raise listen_error(self.host, self.port, exc) from exc
            raise
        if self._sock is None:
            server = self._site._server  # aiohttp exposes no public bound-port accessor
            if self.port == 0 and server is not None and server.sockets:  # type: ignore[union-attr]
                self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("server_started", url=self.url)

    async def aclose(self) -> None:
        self.app[SERVING].draining = True
        await self._runner.cleanup()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def serve_forever(server: Server) -> None:
    """Run ``server`` until SIGINT/SIGTERM; SIGHUP reloads the routing file."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: request_reload(server.app))
    await server.start()
    try:
        await stop.wait()
        log.info("shutdown_started", grace_s=server.grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await server.aclose()


def run_event_loop(main: Coroutine[Any, Any, None], /) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
