"""Test doubles and the local demo: not part of the data plane.

Stand-in upstreams that answer (and misbehave) like the real OpenAI-compatible APIs,
a real Prometheus run as a child process, a TCP forwarder that can cut a link, and
the ``skyroute demo`` runner that puts them together with skyroute in front. The test
suite and ``bench/`` use them too;
``skyroute.proxy`` never imports this package except for the ``demo`` command.
"""

from ._forwarder import TcpForwarder
from ._local_prometheus import (
    LocalPrometheus,
    PrometheusNotFound,
    PrometheusStartError,
    find_prometheus,
    free_port,
)
from ._runner import demo_config_text, run_demo
from ._standin import Behaviour, StandinUpstream

__all__ = [
    "Behaviour",
    "LocalPrometheus",
    "PrometheusNotFound",
    "PrometheusStartError",
    "StandinUpstream",
    "TcpForwarder",
    "demo_config_text",
    "find_prometheus",
    "free_port",
    "run_demo",
]
