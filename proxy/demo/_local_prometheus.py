"""A real Prometheus server run as a child process, for ``skyroute demo --prometheus`` and tests.

``LocalPrometheus`` owns one ``prometheus`` process: it writes a scrape config for the
given targets into a working directory, starts the binary on a free 127.0.0.1 port with
its data there, waits until ``/-/ready`` answers, and stops it again (SIGTERM, then
SIGKILL). ``find_prometheus`` says which binary to run, or how to get one.

* The child stays in its parent's process group, so Ctrl-C in a terminal reaches both and
  whoever started the group can check that nothing was left behind.
* The port is picked by binding port 0 and closing the socket before Prometheus binds it;
  another process can take it in between, so a start that fails with "address already in
  use" is retried on a new port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, final

import aiohttp
import structlog
import yaml

__all__ = ["PROMETHEUS_BIN_ENV", "LocalPrometheus", "PrometheusNotFound", "find_prometheus",
           "free_port"]

log = structlog.get_logger("skyroute.prometheus")

#: Environment variable naming the ``prometheus`` binary (``--prometheus-bin`` wins over it).
PROMETHEUS_BIN_ENV: Final = "SKYROUTE_PROMETHEUS_BIN"
#: Prometheus replays its (empty) write-ahead log and loads the config before it is ready;
#: a few seconds on an idle machine, much longer on a loaded 2-core one.
READY_TIMEOUT_S: Final = 60.0
_READY_POLL_S: Final = 0.1
_STOP_TIMEOUT_S: Final = 10.0
_PORT_ATTEMPTS: Final = 3
_LOG_TAIL_CHARS: Final = 2000
_LAST_LINE_CHARS: Final = 300


class PrometheusNotFound(RuntimeError):
    """No usable ``prometheus`` binary; the message says how to get or name one."""


class PrometheusStartError(RuntimeError):
    """Prometheus exited or never became ready.

    ``str()`` is one line ending with Prometheus's last log line (where it says
    why); ``log`` holds the end of its log, also shown as a note in a traceback.
    """

    def __init__(self, what: str, log: str) -> None:
        last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()),
                    "(empty)")
        super().__init__(f"{what}; its last log line: {last[:_LAST_LINE_CHARS]}")
        self.log = log
        self.add_note(f"the end of its log:\n{log}")


def find_prometheus(explicit: str | None = None) -> str:
    """The ``prometheus`` binary to run: ``explicit``, else ``$SKYROUTE_PROMETHEUS_BIN``, else PATH.

    Raises:
        PrometheusNotFound: the named file is not an executable, or there is none on PATH.
    """
    for origin, name in (("--prometheus-bin", explicit),
                         (PROMETHEUS_BIN_ENV, os.environ.get(PROMETHEUS_BIN_ENV))):
        if name:
            path = shutil.which(name)
            if path is None:
                raise PrometheusNotFound(
                    f"{origin} {name}: no executable file there; give the path of a "
                    "prometheus binary (e.g. /usr/bin/prometheus)")
            return path
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusNotFound(
            "the prometheus binary is not installed: install it (Debian/Ubuntu: "
            "apt-get install prometheus; elsewhere: https://prometheus.io/download/) or "
            f"point at one with --prometheus-bin PATH or {PROMETHEUS_BIN_ENV}=PATH")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may take it before you do)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def scrape_config(jobs: Mapping[str, Sequence[str]], *, interval_s: float) -> str:
    """A Prometheus config scraping each job's ``host:port`` targets every ``interval_s``."""
    every = f"{int(interval_s * 1000)}ms"
    config = {
        "global": {"scrape_interval": every, "scrape_timeout": every,
                   "evaluation_interval": every},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                           for job, targets in jobs.items() if targets],
    }
    return yaml.safe_dump(config, sort_keys=False)


@final
class LocalPrometheus:
    """One Prometheus process on a free 127.0.0.1 port, scraping ``jobs``.

    Args:
        jobs: job name -> ``host:port`` targets whose ``/metrics`` it scrapes.
        binary: the ``prometheus`` executable (see ``find_prometheus``).
        interval_s: scrape and evaluation interval.
        workdir: where the config, data and log go (default: a temporary directory
            removed by ``aclose``).
    """

    def __init__(self, jobs: Mapping[str, Sequence[str]], *, binary: str,
                 interval_s: float = 1.0, workdir: Path | None = None) -> None:
        self.jobs = {job: tuple(targets) for job, targets in jobs.items()}
        self.binary = binary
        self.interval_s = interval_s
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._port: int | None = None

    def __repr__(self) -> str:
        state = "stopped" if self._proc is None else f"pid={self._proc.pid}"
        return f"<LocalPrometheus {self._port or '-'} {state} jobs={sorted(self.jobs)}>"

    @property
    def url(self) -> str:
        """Its base URL, e.g. ``http://127.0.0.1:40123`` (UI and ``/api/v1/query``)."""
        if self._port is None:
            raise RuntimeError("LocalPrometheus.url read before start()")
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, *, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Write the config, start Prometheus and return once it is ready.

        Raises:
            PrometheusStartError: it exited (the message has its last log line) or was not ready
                within ``timeout_s``; nothing is left running.
            RuntimeError: ``start()`` called twice.
        """
        if self._proc is not None:
            raise RuntimeError("LocalPrometheus.start() called twice")
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="skyroute-prometheus-")
            self._workdir = Path(self._tempdir.name)
        self._workdir.mkdir(parents=True, exist_ok=True)
        config = self._workdir / "prometheus.yml"
        config.write_text(scrape_config(self.jobs, interval_s=self.interval_s))
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                await self._start_once(config, timeout_s)
                break
            except PrometheusStartError as exc:
                await self.aclose(keep_workdir=True)
                if "address already in use" not in exc.log or attempt == _PORT_ATTEMPTS:
                    self._remove_workdir()
                    raise
            except BaseException:  # cancelled (Ctrl-C) while starting: leave nothing behind
                await asyncio.shield(self.aclose())
                raise
        log.info("demo_prometheus_started", url=self.url, pid=self.pid, jobs=self.jobs)

    async def _start_once(self, config: Path, timeout_s: float) -> None:
        assert self._workdir is not None
        self._port = free_port()
        log_path = self._workdir / "prometheus.log"
        with log_path.open("wb") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                self.binary, f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{self._port}",
                f"--storage.tsdb.path={self._workdir / 'data'}",
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                stderr=asyncio.subprocess.STDOUT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while not await self._is_ready(http):
                if self._proc.returncode is not None:
                    raise PrometheusStartError(
                        f"prometheus ({self.binary}) exited with status "
                        f"{self._proc.returncode} at start", _tail(log_path))
                if loop.time() > deadline:
                    raise PrometheusStartError(
                        f"prometheus ({self.binary}) was not ready on {self.url} within "
                        f"{timeout_s:g} s", _tail(log_path))
                await asyncio.sleep(_READY_POLL_S)

    async def _is_ready(self, http: aiohttp.ClientSession) -> bool:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with http.get(f"{self.url}/-/ready") as resp:
                return resp.status == 200
        return False

    async def aclose(self, *, keep_workdir: bool = False) -> None:
        """Stop Prometheus (SIGTERM, SIGKILL after 10 s) and wait for it; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if not keep_workdir:
            self._remove_workdir()

    def _remove_workdir(self) -> None:
        tempdir, self._tempdir = self._tempdir, None
        if tempdir is not None:
            tempdir.cleanup()
            self._workdir = None

    async def __aenter__(self) -> LocalPrometheus:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError as exc:
        return f"(no log: {exc})"
