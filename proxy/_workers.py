"""``skyroute run --workers N``: N worker processes on one port, under one supervisor.

Theory of operation:

- The supervisor is a small process that never serves a request. It checks the
  listen address (and, for port 0, reserves a free port with a bound but not
  listening ``SO_REUSEPORT`` socket), then starts N ``skyroute run`` worker
  processes. Each worker binds the same port with ``SO_REUSEPORT``; the kernel
  spreads new connections over the workers' listening sockets, so no request ever
  passes through the supervisor.
- State stays one: every worker is a statesync peer of every other one over
  127.0.0.1. The supervisor owns one listening socket per worker slot (a free
  127.0.0.1 port), hands it to the worker, and keeps it across restarts, so the
  peers' URLs never change and a restarted worker's inbound sync queues in the
  backlog until it accepts again. The sync token is the routing file's
  ``sync.token``, or one generated per run when the file has no ``sync`` section.
- ``/metrics`` is whole from any worker: prometheus_client's multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR`` in a temporary directory of the supervisor).
- A worker that dies is started again (at once, then with a doubling delay while
  it keeps dying young). SIGHUP is forwarded to every worker (each reloads the
  file); SIGTERM/SIGINT are forwarded and the supervisor waits for every worker to
  drain (each honours ``--grace``), then exits. Workers watch a pipe from the
  supervisor: if the supervisor is killed outright, they drain and exit too.

- With ``jobs.lane.process: separate`` (``auto``, the default, with a Redis queue), one
  more worker, the jobs worker, runs the jobs lane and nothing else at the kernel's idle
  CPU priority (``SCHED_IDLE``): it listens only on its sync socket, so clients never reach
  it, and it gets a core only while no serving worker (nor anything else) wants it. Serving
  workers accept submits into the shared queue and poke it through a pipe. Even
  ``--workers 1`` then runs under a supervisor: one serving worker and the jobs worker.

What a worker needs from its supervisor travels in one environment variable,
``SKYROUTE_WORKER`` (a ``WorkerSpec`` as JSON), so the worker command line is a
plain ``skyroute run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import final

import structlog
from skyroute.routing import Config

from ._logging import flush_logs
from ._startup import StartupError, listen_error

log = structlog.get_logger("skyroute.workers")

#: The environment variable a worker's ``WorkerSpec`` travels in.
WORKER_ENV = "SKYROUTE_WORKER"
#: A worker that lived this long before dying is restarted at once.
_HEALTHY_LIFETIME_S = 10.0
#: The longest wait before restarting a worker that keeps dying young.
_MAX_RESTART_DELAY_S = 10.0
#: How long a worker has to report it is listening.
_START_TIMEOUT_S = 60.0
#: Past the grace period, how long the supervisor waits before it kills a worker.
_KILL_AFTER_GRACE_S = 10.0


def auto_workers() -> int:
    """The number of cores this process may run on (``--workers auto``)."""
    return len(os.sched_getaffinity(0))


#: ``WorkerSpec.role`` of the jobs worker.
JOBS_ROLE = "jobs"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """What one worker process is told by its supervisor."""

    index: int
    token: str
    sync_fd: int  # a listening 127.0.0.1 socket: this worker's own sync endpoint
    peer_ports: tuple[int, ...]  # the other workers' sync ports
    ready_fd: int  # written to once the worker listens
    lifeline_fd: int  # readable (EOF) once the supervisor is gone
    #: ``serve``: listens on the public port; ``jobs``: runs the jobs lane, serves only its
    #: sync port, at idle CPU priority (``jobs.lane.process: separate``).
    role: str = "serve"
    #: The jobs wake-up pipe: its write end in a serving worker (a submit pokes the lane),
    #: its read end in the jobs worker; None without a jobs worker.
    wake_fd: int | None = None

    @property
    def runs_jobs(self) -> bool:
        return self.role == JOBS_ROLE

    @property
    def peers(self) -> tuple[str, ...]:
        """The other workers' sync base URLs."""
        return tuple(f"ws://127.0.0.1:{port}/sync" for port in self.peer_ports)

    def sync_instance_id(self, instance_id: str) -> str:
        """This worker's statesync identity: unique, so peers can tell workers apart."""
        return f"{instance_id}-w{self.index}"

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def pop_from_env(cls) -> WorkerSpec | None:
        """The spec this process was started with (removed from the environment)."""
        text = os.environ.pop(WORKER_ENV, None)
        if text is None:
            return None
        fields = json.loads(text)
        fields["peer_ports"] = tuple(fields["peer_ports"])
        return cls(**fields)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening ``SO_REUSEPORT`` socket holding ``host:port`` for the workers.

    Raises:
        StartupError: the address cannot be bound (in use by another program, not
            this machine's, does not resolve).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise listen_error(host, port, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise listen_error(host, port, exc) from exc
    return sock


def _sync_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@final
class _Slot:
    """One worker position: its sync socket and port outlive the processes that fill it."""

    def __init__(self, index: int, role: str = "serve") -> None:
        self.index = index
        self.role = role
        self.sync = _sync_socket()
        self.port: int = self.sync.getsockname()[1]
        self.proc: asyncio.subprocess.Process | None = None
        self.lifeline_w: int | None = None
        self.started_at = 0.0
        self.quick_deaths = 0
        # Until a worker listens it has no SIGHUP handler: a SIGHUP would kill it.
        self.ready = False


@final
class Supervisor:
    """Runs and watches ``workers`` skyroute processes serving one routing file, and with
    ``jobs_worker`` one more that runs the jobs lane (``jobs.lane.process: separate``)."""

    def __init__(self, *, config: Config, config_path: str, workers: int, host: str,
                 port: int, grace_s: float, log_options: list[str],
                 jobs_worker: bool = False) -> None:
        self._config_path = config_path
        self._grace_s = grace_s
        self._log_options = log_options
        self._listen = reserve_port(host, port)
        self.host = host
        self.port: int = self._listen.getsockname()[1]
        self._token = config.sync.token if config.sync is not None else secrets.token_hex(16)
        self._slots = [_Slot(i) for i in range(workers)]
        # The jobs worker is a slot like the others (a sync peer, restarted when it dies);
        # serving workers poke it through one pipe whenever a submit queues work.
        self._wake: tuple[int, int] | None = None
        if jobs_worker:
            self._slots.append(_Slot(workers, JOBS_ROLE))
            self._wake = os.pipe()
            os.set_blocking(self._wake[1], False)  # a full pipe already says "wake up"
        self._metrics_dir = tempfile.mkdtemp(prefix="skyroute-metrics-")
        self._stopping = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "skyroute.proxy.cli", *self._log_options, "run",
                "-c", self._config_path, "--host", self.host, "--port", str(self.port),
                "--grace", str(self._grace_s), "--workers", "1"]

    async def _start(self, slot: _Slot) -> bool:
        """Start ``slot``'s worker and wait until it listens; False if it died first."""
        slot.ready = False
        ready_r, ready_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        wake_fd = None if self._wake is None else self._wake[0 if slot.role == JOBS_ROLE else 1]
        spec = WorkerSpec(index=slot.index, token=self._token, sync_fd=slot.sync.fileno(),
                          peer_ports=tuple(s.port for s in self._slots if s is not slot),
                          ready_fd=ready_w, lifeline_fd=lifeline_r, role=slot.role,
                          wake_fd=wake_fd)
        env = {**os.environ, WORKER_ENV: spec.to_env(),
               "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        fds = (slot.sync.fileno(), ready_w, lifeline_r, *(() if wake_fd is None else (wake_fd,)))
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *self._command(), env=env, pass_fds=fds)
        finally:
            os.close(ready_w)
            os.close(lifeline_r)
        if slot.lifeline_w is not None:
            os.close(slot.lifeline_w)
        slot.lifeline_w = lifeline_w
        slot.started_at = time.monotonic()
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                ready = await asyncio.to_thread(os.read, ready_r, 1)
        finally:
            os.close(ready_r)
        if ready:
            slot.ready = True
            log.info("worker_started", worker=slot.index, pid=slot.proc.pid, role=slot.role)
        return bool(ready)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward_reload)
        watchers: list[asyncio.Task[None]] = []
        stopped = asyncio.ensure_future(stop.wait())
        try:
            # SIGTERM during start-up stops at once, not once every worker has started.
            starting = asyncio.ensure_future(self._start_all())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not stopped.done():
                if not starting.result():
                    log.error("worker_start_failed", hint="see the worker's line above")
                    return 1
                log.info("workers_started", url=self.url,
                         workers=sum(s.role != JOBS_ROLE for s in self._slots),
                         pids=[s.proc.pid for s in self._slots if s.proc],
                         jobs_pid=next((s.proc.pid for s in self._slots
                                        if s.role == JOBS_ROLE and s.proc), None))
                watchers = [asyncio.create_task(self._watch(s)) for s in self._slots]
                await stopped
            starting.cancel()
            log.info("shutdown_started", grace_s=self._grace_s, workers=len(self._slots))
            return 0
        finally:
            self._stopping = True
            stopped.cancel()
            for task in watchers:
                task.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(sig)
            await self._stop_all()
            self._close()

    async def _start_all(self) -> bool:
        """Start every worker; False if one died before it listened.

        The first starts alone, so that a start-up failure (the same for all) is said
        once, by it.
        """
        if not await self._start(self._slots[0]):
            return False
        return all(await asyncio.gather(*(self._start(s) for s in self._slots[1:])))

    async def _watch(self, slot: _Slot) -> None:
        """Restart ``slot``'s worker whenever it dies, until shutdown."""
        while not self._stopping:
            assert slot.proc is not None
            pid = slot.proc.pid
            code = await slot.proc.wait()
            self._mark_dead(pid)
            if self._stopping:
                return
            lived = time.monotonic() - slot.started_at
            slot.quick_deaths = 0 if lived >= _HEALTHY_LIFETIME_S else slot.quick_deaths + 1
            delay = min(_MAX_RESTART_DELAY_S, 0.5 * 2 ** (slot.quick_deaths - 1)) \
                if slot.quick_deaths > 1 else 0.0
            log.warning("worker_exited", worker=slot.index, pid=pid, exit_code=code,
                        restart_in_s=delay)
            if delay:
                await asyncio.sleep(delay)
            if not self._stopping:
                await self._start(slot)

    def _forward_reload(self) -> None:
        # A worker still starting reads the file as it is now anyway.
        pids = self._signal_all(signal.SIGHUP, ready_only=True)
        log.info("reload_forwarded", pids=pids)

    def _signal_all(self, sig: int, *, ready_only: bool = False) -> list[int]:
        sent = []
        for slot in self._slots:
            if ready_only and not slot.ready:
                continue
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)
                    sent.append(slot.proc.pid)
        return sent

    async def _stop_all(self) -> None:
        """SIGTERM every worker and wait for its drain; kill what outlives the grace."""
        self._signal_all(signal.SIGTERM)
        procs = [s.proc for s in self._slots if s.proc is not None]
        try:
            async with asyncio.timeout(self._grace_s + _KILL_AFTER_GRACE_S):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker_killed", pid=proc.pid, grace_s=self._grace_s)
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        # Live gauges (in-flight requests) of a dead worker no longer count.
        multiprocess.mark_process_dead(pid, self._metrics_dir)

    def _close(self) -> None:
        for slot in self._slots:
            slot.sync.close()
            if slot.lifeline_w is not None:
                os.close(slot.lifeline_w)
                slot.lifeline_w = None
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        self._listen.close()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)


def run_at_idle_priority() -> str:
    """Put this process (every thread it has, and so every thread they start) in the
    kernel's idle scheduling class; returns what it got, for the log.

    ``SCHED_IDLE`` (Linux): a runnable serving worker preempts this one at once, where
    even nice 19 only weighs it down. Lowering one's own priority needs no privilege (and
    cannot be undone without it), so the jobs worker calls this once it has started: its
    start-up (imports, the app) runs at normal priority and does not wait for idle cores.
    Elsewhere the lowest nice value is the nearest thing.
    """
    if hasattr(os, "SCHED_IDLE"):
        try:
            for thread in os.listdir("/proc/self/task"):
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.sched_setscheduler(int(thread), os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError as exc:
            log.warning("idle_priority_refused", error=repr(exc), fallback="nice 19")
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    return "nice 19"


def worker_started(spec: WorkerSpec) -> None:
    """Tell the supervisor this worker listens."""
    os.write(spec.ready_fd, b"1")
    os.close(spec.ready_fd)


def _exit_now() -> None:
    """Exit at once (a drain that hangs), the log lines still batched written first."""
    flush_logs()
    os._exit(1)


def stop_when_supervisor_exits(spec: WorkerSpec, stop: asyncio.Event, *,
                               grace_s: float) -> None:
    """Drain (set ``stop``) when the supervisor's end of the lifeline closes (it died).

    Nobody is left to kill this worker if its drain hangs, so it exits by itself
    ``grace_s`` plus the supervisor's own margin later.
    """
    loop = asyncio.get_running_loop()

    def orphaned() -> None:
        loop.remove_reader(spec.lifeline_fd)  # at EOF the pipe stays readable: once only
        log.warning("worker_orphaned", exit_in_s=grace_s + _KILL_AFTER_GRACE_S)
        stop.set()
        loop.call_later(grace_s + _KILL_AFTER_GRACE_S, _exit_now)

    loop.add_reader(spec.lifeline_fd, orphaned)


def check_workers(text: str) -> int | None:
    """``--workers``: a count >= 1, or ``auto`` (None: decide at run time)."""
    if text == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{text!r} is not a worker count: give a number >= 1 or auto")
    return count


def raise_if_unusable(workers: int) -> None:
    """SO_REUSEPORT is what shares the port; say so where it is missing."""
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise StartupError("--workers needs SO_REUSEPORT, which this system lacks; "
                           "run with --workers 1")
