"""The ``skyroute`` command line: ``run``, ``validate`` and ``demo`` (``--prometheus``).

The global options ``--log-level`` and ``--log-format`` go before or after the
command (``skyroute run -c f --log-level debug``). Exit status: 0 done, 1 skyroute
could not start or the routing file is invalid, 2 the command line is wrong. Each
failure is one line on stderr saying what was wrong, where, and what to do
(``skyroute: ...``, or a ``startup_failed`` event when ``run`` or ``demo`` logs
JSON); a traceback is shown only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata
from typing import NoReturn

import structlog
from skyroute.routing import Config, ConfigError, ConfigProblem, LaneProcess

from ._config_file import load_config
from ._logging import configure_logging
from ._startup import StartupError
from ._workers import (
    Supervisor,
    WorkerSpec,
    auto_workers,
    check_workers,
    raise_if_unusable,
    run_at_idle_priority,
    stop_when_supervisor_exits,
    worker_started,
)

#: Exit status when skyroute could not start or the routing file is invalid.
EXIT_FAILED = 1
#: Exit status for a wrong command line (argparse's own convention).
EXIT_USAGE = 2
#: 128 + SIGINT, as a shell reports a process stopped by Ctrl-C.
EXIT_INTERRUPTED = 130

LOG_LEVELS = ("debug", "info", "warning", "error")
#: Commands whose output is a log: their failure to start is a log event in a JSON log.
SERVING_COMMANDS = ("run", "demo")
LOG_FORMATS = ("json", "console")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage error is one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}; see {self.prog} --help\n")


def _add_global_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    """``--log-level`` and ``--log-format``, on the top parser and on each command.

    A command's copies have no default, so one given before the command is not
    reset by the command's parser; given in both places, the later one wins.
    """
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        default="info" if with_defaults else argparse.SUPPRESS,
                        help="the least important log level written (default info); "
                             "debug also shows tracebacks")
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        default=None if with_defaults else argparse.SUPPRESS,
                        help="default: console on a terminal, JSON otherwise")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0-65535 "
                                         "(0 picks a free one)")
    return port


def _workers(text: str) -> int | None:
    try:
        return check_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="skyroute",
        description="Multi-cloud smart reverse proxy for OpenAI-compatible LLM APIs.")
    parser.add_argument("--version", action="version", version=f"skyroute {_version()}")
    _add_global_options(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve a routing file")
    run.add_argument("-c", "--config", required=True, help="the routing YAML file")
    run.add_argument("--port", type=_port, help="override listen port (0 picks a free one)")
    run.add_argument("--host", help="override listen host")
    run.add_argument("--grace", type=float,
                     default=float(os.environ.get("SKYROUTE_SHUTDOWN_GRACE_SECONDS", "30")),
                     help="seconds requests in flight get to finish on SIGTERM "
                          "(env SKYROUTE_SHUTDOWN_GRACE_SECONDS; default 30)")
    run.add_argument("--workers", type=_workers, default="auto", metavar="N",
                     help="worker processes sharing the port (SO_REUSEPORT) under one "
                          "supervisor, peered over state sync; auto (default): one per "
                          "core this process may use; 1: no supervisor (unless the jobs "
                          "lane runs in a jobs worker: jobs.lane.process)")
    validate = commands.add_parser("validate", help="check a routing file and list problems")
    validate.add_argument("config", help="the routing YAML file")
    commands.add_parser("schema", help="print the routing file's JSON Schema (for editors)")
    demo = commands.add_parser(
        "demo", help="run a local demo: stand-in regions, a GPU pool and skyroute (no keys)")
    demo.add_argument("--port", type=_port, default=8080,
                      help="skyroute's port (0: a free one)")
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
    for command in {id(p): p for p in commands.choices.values()}.values():
        _add_global_options(command, with_defaults=False)
    return parser


def _version() -> str:
    try:
        return metadata.version("skyroute")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skyroute`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    args.worker = WorkerSpec.pop_from_env() if args.command == "run" else None
    json_logs = None if args.log_format is None else args.log_format == "json"
    json_logs = configure_logging(level=args.log_level, json=json_logs,
                                  pid=args.worker is not None)
    # Serving commands keep a JSON log JSON to its last line; the others print plain text.
    json_logs = json_logs and args.command in SERVING_COMMANDS
    debug = args.log_level == "debug"
    try:
        if args.command == "validate":
            return _validate(args.config)
        if args.command == "demo":
            return _demo(args)
        if args.command == "schema":
            return _schema()
        return _run(args)
    except StartupError as exc:
        if debug:
            traceback.print_exc()
        _report(str(exc), json_logs=json_logs)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _report(f"{args.command} failed: {type(exc).__name__}: {first}; run again with "
                "--log-level debug to see the traceback", json_logs=json_logs)
    return EXIT_FAILED


def _report(message: str, *, json_logs: bool) -> None:
    """Say why skyroute stopped: a ``skyroute: ...`` line, or an event in a JSON log."""
    for line in message.splitlines():
        if json_logs:
            structlog.get_logger("skyroute.cli").error("startup_failed", error=line)
        else:
            print(f"skyroute: {line}", file=sys.stderr, flush=True)


def _load(path: str) -> Config:
    """Read and validate the routing file.

    Raises:
        StartupError: unreadable, or invalid (one ``file:line: path: message`` line
            per problem).
    """
    try:
        return load_config(path)
    except ConfigError as exc:
        raise StartupError("\n".join(_one_line(exc.source, p) for p in exc.problems)) from exc


def _one_line(source: str, problem: ConfigProblem) -> str:
    """``file:line: path: message``; a problem with the whole file names no path."""
    if problem.path != "(file)":
        return f"{source}:{problem.line or '?'}: {problem.path}: {problem.message}"
    return f"{source}:{problem.line}: {problem.message}" if problem.line else problem.message


def _validate(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        if all(p.path == "(file)" and p.line is None for p in exc.problems):
            raise StartupError(_one_line(exc.source, exc.problems[0])) from exc  # unreadable
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    print(f"{path}: OK ({len(config.upstreams)} upstreams, {len(config.routes)} routes: "
          f"{', '.join(r.model for r in config.routes)})")
    return 0


def _schema() -> int:
    from skyroute.routing.schema import routing_json_schema

    print(json.dumps(routing_json_schema(), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from . import _worker_metrics as worker_metrics
    from ._app import build_app
    from ._server import Server, run_event_loop, serve_forever

    config = _load(args.config)
    workers = args.workers if args.workers is not None else auto_workers()
    if args.worker is None and (workers > 1 or _jobs_process(config)):
        return _supervise(args, config, workers)
    spec: WorkerSpec | None = args.worker

    async def main() -> None:
        if spec is None:
            server = Server(config, config_path=args.config, host=args.host, port=args.port,
                            grace_s=args.grace)
            await serve_forever(server)
            return
        worker_metrics.install()  # before build_app creates the metrics
        app = build_app(config, config_path=args.config, worker=spec)
        sync = socket.socket(fileno=spec.sync_fd)
        if spec.runs_jobs:  # no public port: clients never reach the jobs worker
            server = Server(config, app=app, sock=sync, grace_s=args.grace)
        else:
            server = Server(config, app=app, host=args.host, port=args.port,
                            grace_s=args.grace, reuse_port=True, also_on=[sync])
        stop = asyncio.Event()
        stop_when_supervisor_exits(spec, stop, grace_s=args.grace)
        async with worker_metrics.written_on_a_tick():
            await serve_forever(server, stop=stop, on_started=lambda: _started(spec))

    run_event_loop(main())
    return 0


def _supervise(args: argparse.Namespace, config: Config, workers: int) -> int:
    from ._server import run_event_loop

    raise_if_unusable(workers)
    log_options = ["--log-level", args.log_level]
    if args.log_format is not None:
        log_options += ["--log-format", args.log_format]
    supervisor = Supervisor(
        config=config, config_path=args.config, workers=workers,
        host=args.host if args.host is not None else config.listen.host,
        port=args.port if args.port is not None else config.listen.port,
        grace_s=args.grace, log_options=log_options, jobs_worker=_jobs_process(config))
    status = 0

    async def main() -> None:
        nonlocal status
        status = await supervisor.run()

    run_event_loop(main())
    return status


def _started(spec: WorkerSpec) -> None:
    """A worker listens: the jobs worker first drops to idle priority (its start-up ran at
    normal priority, so a busy machine does not hold it), then each tells the supervisor."""
    if spec.runs_jobs:
        priority = run_at_idle_priority()
        structlog.get_logger("skyroute.jobs").info("jobs_worker_priority", priority=priority)
    worker_started(spec)


def _jobs_process(config: Config) -> bool:
    """Whether ``skyroute run`` starts a jobs worker (``jobs.lane.process``)."""
    return config.jobs is not None and config.jobs.lane_process is LaneProcess.SEPARATE


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
        raise StartupError(f"demo --prometheus: {exc}") from exc
    return 0


if __name__ == "__main__":
    sys.exit(main())
