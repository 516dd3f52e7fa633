"""The embedded job store: SQLite in WAL mode under ``jobs.data_dir``, off the event loop.

One thread owns the connection. Callers queue operations (plain functions of a
``sqlite3.Connection``) and await their results; the thread takes every operation
waiting, runs them in one transaction (each in its own savepoint, so one failing
operation rolls back only itself) and commits once: a group commit, so a burst of
submissions costs one fsync, and an operation's future resolves only after its
commit, so an accepted job is on disk before the client hears 202.

``synchronous=FULL``: a commit survives a power cut, not only a killed process.
Several processes (``--workers``) open the same file; ``busy_timeout`` makes them
wait their turn for the write lock instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]

#: Operations committed together at most; bounds one transaction's latency.
GROUP_COMMIT_MAX: Final = 512
#: How long a process waits for another's write lock before an operation fails.
BUSY_TIMEOUT_MS: Final = 10_000

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    batch_id TEXT,
    line INTEGER,
    custom_id TEXT,
    owner TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    body BLOB,
    state TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL,
    worker TEXT,
    lease_until REAL,
    status INTEGER,
    response BLOB,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    idem_key TEXT,
    body_hash TEXT,
    webhook TEXT,
    webhook_state TEXT,
    webhook_tries INTEGER NOT NULL DEFAULT 0,
    webhook_next REAL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(state, not_before);
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs(batch_id, line);
CREATE INDEX IF NOT EXISTS jobs_batch_state ON jobs(batch_id, state);
CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs(webhook_state, webhook_next);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idem_key)
    WHERE idem_key IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_custom_id ON jobs(batch_id, custom_id)
    WHERE batch_id IS NOT NULL AND custom_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    in_progress_at REAL,
    expires_at REAL,
    finalizing_at REAL,
    completed_at REAL,
    failed_at REAL,
    expired_at REAL,
    cancelling_at REAL,
    cancelled_at REAL
);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE INDEX IF NOT EXISTS files_by_owner ON files(owner, created_at, id);
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches(owner, created_at, id);
"""


class SqliteRunner:
    """The thread that owns one SQLite connection and group-commits queued operations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ops: queue.SimpleQueue[tuple[Operation[Any], asyncio.Future[Any]] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Open (and create) the database, then start the thread."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name="skyroute-jobs-sqlite", daemon=True)
        self._thread.start()
        await ready

    async def run(self, operation: Operation[T]) -> T:
        """Run ``operation(connection)`` in the next group commit; its result once committed.

        Raises:
            whatever ``operation`` raised (its changes are rolled back), or
            ``sqlite3.Error`` if the commit failed.
        """
        if self._loop is None:
            raise RuntimeError("SqliteRunner.run() called before start()")
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put((operation, future))
        return await future

    async def aclose(self) -> None:
        if self._thread is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True,
                                     timeout=BUSY_TIMEOUT_MS / 1000)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        connection.executescript(SCHEMA)
        return connection

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            connection = self._connect()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, [(ready, None, exc)])
            return
        loop.call_soon_threadsafe(_settle, [(ready, None, None)])
        with contextlib.closing(connection):
            while True:
                first = self._ops.get()
                if first is None:
                    return
                group = [first]
                stop = False
                while len(group) < GROUP_COMMIT_MAX:
                    try:
                        item = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    group.append(item)
                results = self._commit(connection, group)
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    loop.call_soon_threadsafe(_settle, results)
                if stop:
                    return

    @staticmethod
    def _commit(connection: sqlite3.Connection,
                group: list[tuple[Operation[Any], asyncio.Future[Any]]],
                ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for operation, future in group:
                connection.execute("SAVEPOINT op")
                try:
                    value = operation(connection)
                except Exception as exc:
                    connection.execute("ROLLBACK TO op")
                    connection.execute("RELEASE op")
                    results.append((future, None, exc))
                else:
                    connection.execute("RELEASE op")
                    results.append((future, value, None))
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            return [(future, None, exc) for _, future in group]
        return results


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        if future.done():  # the caller was cancelled; the operation still committed
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
