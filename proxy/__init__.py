"""The data plane: an aiohttp server that moves OpenAI API traffic to upstreams.

It asks ``routing`` where each request goes, forwards it (streaming included),
and reports what happened back to ``routing``, to ``/metrics`` and to the log.
"""

from ._app import build_app
from ._config_file import load_config
from ._errors import ClientRequestError, ProxyError, UpstreamError
from ._logging import configure_logging
from ._server import Server, serve_forever
from ._startup import StartupError

__all__ = [
    "ClientRequestError",
    "ProxyError",
    "Server",
    "StartupError",
    "UpstreamError",
    "build_app",
    "configure_logging",
    "load_config",
    "serve_forever",
]
