"""The ``skyroute`` command line: ``run``, ``validate`` and ``demo`` (``--prometheus``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from skyroute.routing import ConfigError

from ._config_file import load_config
from ._logging import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyroute",
        description="Multi-cloud smart reverse proxy for OpenAI-compatible LLM APIs.")
    parser.add_argument("--version", action="version", version=f"skyroute {_version()}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["json", "console"],
                        help="default: console on a terminal, JSON otherwise")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve a routing file")
    run.add_argument("-c", "--config", required=True, help="the routing YAML file")
    run.add_argument("--port", type=int, help="override listen port (0 picks a free one)")
    run.add_argument("--host", help="override listen host")
    run.add_argument("--grace", type=float,
                     default=float(os.environ.get("SKYROUTE_SHUTDOWN_GRACE_SECONDS", "30")),
                     help="seconds requests in flight get to finish on SIGTERM "
                          "(env SKYROUTE_SHUTDOWN_GRACE_SECONDS; default 30)")
    validate = commands.add_parser("validate", help="check a routing file and list problems")
    validate.add_argument("config", help="the routing YAML file")
    commands.add_parser("schema", help="print the routing file's JSON Schema (for editors)")
    demo = commands.add_parser(
        "demo", help="run a local demo: stand-in regions, a GPU pool and skyroute (no keys)")
    demo.add_argument("--port", type=int, default=8080, help="skyroute's port (0: a free one)")
    demo.add_argument("--instances", type=int, default=1,
                      help="run this many skyroute instances peered over state sync "
                           "(on consecutive ports)")
    demo.add_argument("--print-config", action="store_true",
                      help="print the embedded routing file and exit")
    demo.add_argument("--prometheus", action="store_true",
                      help="also run a real Prometheus (a free port) that scrapes every "
                           "instance each second; the instances read upstream latency from it")
    demo.add_argument("--prometheus-bin", metavar="PATH",
                      help="the prometheus binary to run (implies --prometheus; default: "
                           "$SKYROUTE_PROMETHEUS_BIN, else prometheus on PATH)")
    return parser


def _version() -> str:
    try:
        return metadata.version("skyroute")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skyroute`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    json_logs = None if args.log_format is None else args.log_format == "json"
    configure_logging(level=args.log_level, json=json_logs)
    if args.command == "validate":
        return _validate(args.config)
    if args.command == "demo":
        return _demo(args)
    if args.command == "schema":
        return _schema()
    return _run(args)


def _validate(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(config.upstreams)} upstreams, {len(config.routes)} routes: "
          f"{', '.join(r.model for r in config.routes)})")
    return 0


def _schema() -> int:
    from skyroute.routing.schema import routing_json_schema

    print(json.dumps(routing_json_schema(), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from ._server import Server, run_event_loop, serve_forever

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1

    async def main() -> None:
        server = Server(config, config_path=args.config, host=args.host, port=args.port,
                        grace_s=args.grace)
        await serve_forever(server)

    run_event_loop(main())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._server import run_event_loop
    from .demo import (
        PrometheusNotFound,
        PrometheusStartError,
        demo_config_text,
        find_prometheus,
        run_demo,
    )

    if args.print_config:
        print(demo_config_text(), end="")
        return 0
    prometheus_bin = None
    try:
        if args.prometheus or args.prometheus_bin:
            prometheus_bin = find_prometheus(args.prometheus_bin)  # before anything starts
        run_event_loop(run_demo(port=args.port, instances=max(1, args.instances),
                                prometheus_bin=prometheus_bin))
    except (PrometheusNotFound, PrometheusStartError) as exc:
        print(f"skyroute demo --prometheus: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
