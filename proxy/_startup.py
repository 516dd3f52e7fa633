"""Why skyroute could not start, said in one line a user can act on.

``StartupError`` is raised for every failure the user can fix before serving begins
(the listen address, the routing file, a missing binary); the CLI prints its
message as ``skyroute: <message>`` and exits 1, without a traceback. Each message
says what was wrong, where, and what to do.
"""

from __future__ import annotations

import errno
import socket


class StartupError(Exception):
    """skyroute cannot start; ``str()`` is one line: what, where, and what to do.

    A routing file with several problems gives one line per problem.
    """


#: errno -> (what went wrong, what to do), for the bind errors a user can cause.
_BIND_ERRORS = {
    errno.EADDRINUSE: ("address already in use",
                       "stop the other process or pass --port (0 picks a free port)"),
    errno.EADDRNOTAVAIL: ("this machine has no such address",
                          "pass --host with one of its addresses (127.0.0.1, or 0.0.0.0 for all)"),
    errno.EACCES: ("permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
                   "pass --port 1024 or above"),
}


def listen_error(host: str, port: int, exc: OSError) -> StartupError:
    """The ``StartupError`` for failing to listen on ``host:port`` with ``exc``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        what, todo = ("the host name does not resolve",
                      "pass --host with an address of this machine (127.0.0.1, or 0.0.0.0)")
    else:
        what, todo = _BIND_ERRORS.get(exc.errno or 0, (
            exc.strerror or str(exc), "check --host and --port (or listen in the routing file)"))
    return StartupError(f"cannot listen on {where}: {what}; {todo}")
