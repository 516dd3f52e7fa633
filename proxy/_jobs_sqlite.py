"""The embedded job store: SQLite in WAL mode under ``jobs.data_dir``.

Two connections to one file, one durability rule: an operation's future resolves only
once its commit is on disk (the WAL fsync'd: it survives kill -9 and a power cut, as
``synchronous=FULL`` would), so an accepted job is durable before the client hears 202.
The exception is what a caller marks ``run(durable=False)`` (a jobs worker's store marks
the lane's own records: claims, lease renewals, a batch line's result): committed (so it
survives kill -9) and fsync'd within ``LAZY_SYNC_S``; a power cut can only undo it, which
runs those jobs again (their lines are written once: the output file is made from the
rows, by a durable step).
Both connections commit with ``synchronous=NORMAL`` (to the page cache) and then fsync
the WAL themselves, outside the write lock: a commit holds the lock for microseconds,
not for a disk flush, so the two rarely wait for each other.

* **The store thread** owns the connection for every operation (plain functions of a
  ``sqlite3.Connection``). It takes every operation waiting, runs them in one
  transaction (each in its own savepoint, so one failing operation rolls back only
  itself), commits once and fsyncs once if anything was written (the GIL is released
  meanwhile). It also checkpoints the WAL (NORMAL syncs the WAL before a checkpoint and
  the database after it, so the WAL is never reused before its pages are on disk).
* **The reader thread** runs read-only operations (``read``) on a connection of its own
  (``query_only``), every read waiting in one deferred transaction: in WAL mode a reader
  sees the last commit and never takes the write lock, so a status poll or a ``/health``
  count waits neither for the writes queued before it nor for another process's writer.
* **The accept path** (``insert``): new rows (an async submit) are appended on the
  event loop's own connection, every row waiting in one transaction, then one fsync of
  the WAL in a helper thread covers them; rows arriving during that fsync wait for the
  next one (group commit: one transaction and one fsync per fsync time, however many
  submits). Handing each submit to the store thread instead cost a GIL hand-off and a
  context switch per statement, most of an accept's CPU on a busy core. The loop never
  waits for a lock: if another connection holds the write lock, the rows go to the
  store thread, which waits its turn. The loop's connection never checkpoints (that
  writes and fsyncs the database); it asks the store thread to, once a second.

Several processes (``--workers``) open the same file; ``busy_timeout`` makes their
store threads wait their turn for the write lock instead of failing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]
#: An operation waiting for a store thread: its future, and whether it waits for the disk.
Queued = tuple[Operation[Any], "asyncio.Future[Any]", bool]

#: Operations committed together at most; bounds one transaction's latency.
GROUP_COMMIT_MAX: Final = 512
#: How long a process waits for another's write lock before an operation fails.
BUSY_TIMEOUT_MS: Final = 10_000
#: Fsyncs of the WAL in flight at most. With 2, a commit made during one fsync starts
#: its own at once: bench/jobs.py measured the same p99 for 10-15 % more CPU per accept
#: (twice the transactions, half the group), so rows wait for the next single fsync.
FSYNCS_AT_ONCE: Final = 1
#: Longest a commit nobody waits on (``run(durable=False)``) stays in the page cache before
#: the store thread fsyncs the WAL. A jobs worker fsync'ing after each of its few hundred
#: commits a second set off the kernel's journal and block I/O work (at normal priority,
#: whatever the worker's own), which raised clients' p99 by 12-24 % (bench/jobs.py).
LAZY_SYNC_S: Final = 1.0
#: How often the store thread checkpoints the WAL while the event loop appends to it.
CHECKPOINT_INTERVAL_S: Final = 1.0

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
    """The store thread and the accept path (module docstring) of one database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ops: queue.SimpleQueue[Queued | str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reads: queue.SimpleQueue[Queued | None] = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The accept path (``insert``): the loop's connection, rows waiting for the
        # next group commit, and the fsync in flight.
        self._appender: sqlite3.Connection | None = None
        self._wal_fd: int | None = None
        self._fsync = concurrent.futures.ThreadPoolExecutor(
            FSYNCS_AT_ONCE, thread_name_prefix="skyroute-jobs-fsync")
        self._waiting: list[tuple[str, tuple[Any, ...], asyncio.Future[None]]] = []
        self._flush_due = False
        self._syncing = 0  # fsyncs in flight
        self._checkpoint_asked = 0.0
        #: When the store thread first committed a change not fsync'd since (its own).
        self._unsynced_since: float | None = None
        #: Group commits made on the event loop, and how many rows they held.
        self.loop_commits = 0
        self.loop_rows = 0

    async def start(self) -> None:
        """Open (and create) the database, then start the thread."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._serve, args=(ready, self._ops, self._connect_writer, self._commit,
                                      self._sync_late),
            name="skyroute-jobs-sqlite", daemon=True)
        self._thread.start()
        await ready
        reader_ready: asyncio.Future[None] = self._loop.create_future()
        self._reader = threading.Thread(
            target=self._serve, args=(reader_ready, self._reads, self._connect_reader,
                                      self._read_group),
            name="skyroute-jobs-sqlite-reads", daemon=True)
        self._reader.start()
        await reader_ready
        self._appender = self._connect(schema=False, busy_ms=0)
        # Checkpoints write the database file and fsync it: the store thread's job.
        self._appender.execute("PRAGMA wal_autocheckpoint=0")

    async def insert(self, sql: str, row: tuple[Any, ...]) -> None:
        """Insert ``row`` with ``sql`` (an INSERT) in the next group commit on the event
        loop's connection (module docstring); returns once the row is on disk.

        Raises:
            sqlite3.Error: the insert or its commit failed (nothing was stored).
        """
        if self._loop is None or self._appender is None:
            raise RuntimeError("SqliteRunner.insert() called before start()")
        done: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append((sql, row, done))
        if not self._flush_due and self._syncing < FSYNCS_AT_ONCE:
            self._flush_due = True
            self._loop.call_soon(self._flush)
        await done

    def _flush(self) -> None:
        """Commit every row waiting, then fsync the WAL in the helper thread."""
        self._flush_due = False
        group, self._waiting = self._waiting, []
        if not group:
            return
        db = self._appender
        if db is None or self._loop is None:
            _settle([(future, None, RuntimeError("the job store is closed"))
                     for _, _, future in group])
            return
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # another writer holds the lock: do not wait here
            self._hand_to_thread(group)
            return
        try:
            by_sql: dict[str, list[tuple[Any, ...]]] = {}
            for sql, row, _ in group:
                by_sql.setdefault(sql, []).append(row)
            for sql, rows in by_sql.items():
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            _settle([(future, None, exc) for _, _, future in group])
            return
        self.loop_commits += 1
        self.loop_rows += len(group)
        try:
            synced = self._loop.run_in_executor(self._fsync, self._sync_wal)
        except RuntimeError as exc:  # the store is closing: committed, but not known on disk
            _settle([(future, None, exc) for _, _, future in group])
            return
        self._syncing += 1
        synced.add_done_callback(lambda f: self._synced(f, group))

    def _hand_to_thread(self, group: list[tuple[str, tuple[Any, ...], asyncio.Future[None]]],
                        ) -> None:
        def op(db: sqlite3.Connection) -> None:
            for sql, row, _ in group:
                db.execute(sql, row)

        assert self._loop is not None
        handed: asyncio.Future[None] = self._loop.create_future()
        self._ops.put((op, handed, True))

        def settle(f: asyncio.Future[None]) -> None:
            exc = f.exception()
            _settle([(future, None, exc) for _, _, future in group])

        handed.add_done_callback(settle)

    def _sync_wal(self) -> None:
        """The WAL to disk (from the store thread or the fsync thread; no GIL held)."""
        fd = self._wal_fd
        if fd is None:  # closed: fail the operations, never the thread
            raise sqlite3.OperationalError("the job store is closed")
        try:
            os.fsync(fd)
        except OSError as exc:  # a failing disk: the store's error (a 503 to retry)
            raise sqlite3.OperationalError(f"fsync of the WAL failed: {exc}") from exc

    def _synced(self, synced: asyncio.Future[None],
                group: list[tuple[str, tuple[Any, ...], asyncio.Future[None]]]) -> None:
        self._syncing -= 1
        exc = None if synced.cancelled() else synced.exception()
        if synced.cancelled():
            exc = RuntimeError("the job store closed before the commit reached the disk")
        _settle([(future, None, exc) for _, _, future in group])
        if time.monotonic() - self._checkpoint_asked > CHECKPOINT_INTERVAL_S:
            self._checkpoint_asked = time.monotonic()
            self._ops.put(_CHECKPOINT)
        if self._waiting and not self._flush_due:
            self._flush_due = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    async def run(self, operation: Operation[T], *, durable: bool = True) -> T:
        """Run ``operation(connection)`` in the next group commit; its result once committed
        and (``durable``) on disk, else on disk within ``LAZY_SYNC_S``.

        Raises:
            whatever ``operation`` raised (its changes are rolled back), or
            ``sqlite3.Error`` if the commit failed.
        """
        if self._loop is None:
            raise RuntimeError("SqliteRunner.run() called before start()")
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put((operation, future, durable))
        return await future

    async def read(self, operation: Operation[T]) -> T:
        """Run the read-only ``operation(connection)`` on the reader thread (module
        docstring): it sees every commit made before the call, and takes no write lock.

        Raises:
            whatever ``operation`` raised; ``sqlite3.OperationalError`` if it writes.
        """
        if self._loop is None:
            raise RuntimeError("SqliteRunner.read() called before start()")
        future: asyncio.Future[T] = self._loop.create_future()
        self._reads.put((operation, future, False))
        return await future

    async def aclose(self) -> None:
        while self._syncing or self._flush_due:  # rows promised a commit get it
            await asyncio.sleep(0.001)
        self._fsync.shutdown(wait=True)
        if self._thread is not None:  # it runs what is queued first, and fsyncs it
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._reader is not None:
            self._reads.put(None)
            await asyncio.to_thread(self._reader.join)
            self._reader = None
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _connect(self, *, schema: bool = True,
                 busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True,
                                     timeout=busy_ms / 1000)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        # NORMAL, then our own fsync of the WAL after each commit (module docstring).
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(f"PRAGMA busy_timeout={busy_ms}")
        if schema:
            connection.executescript(SCHEMA)
        return connection

    def _open_wal(self) -> None:
        """The WAL's descriptor for fsyncs, and its name made durable in the directory.

        SQLite keeps the file (same inode) while any connection is open; ours are.
        """
        self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CREAT, 0o600)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _connect_reader(self) -> sqlite3.Connection:
        connection = self._connect(schema=False)
        connection.execute("PRAGMA query_only=1")
        return connection

    def _connect_writer(self) -> sqlite3.Connection:
        connection = self._connect()
        self._open_wal()
        return connection

    def _serve(self, ready: asyncio.Future[None], ops: queue.SimpleQueue[Any],
               connect: Callable[[], sqlite3.Connection],
               run_group: Callable[[sqlite3.Connection, list[Queued]],
                                   list[tuple[asyncio.Future[Any], Any, BaseException | None]]],
               sync_late: Callable[[bool], None] | None = None) -> None:
        """A store thread: every operation waiting on ``ops`` (up to GROUP_COMMIT_MAX) run
        as one group on its own connection, until a None; the writer's queue also carries
        checkpoints, run between groups, and the writer fsyncs what it committed without
        a sync (``sync_late``) once it is ``LAZY_SYNC_S`` old, and before it stops."""
        assert self._loop is not None
        loop = self._loop
        try:
            connection = connect()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, [(ready, None, exc)])
            return
        loop.call_soon_threadsafe(_settle, [(ready, None, None)])
        with contextlib.closing(connection):
            while True:
                since = self._unsynced_since if sync_late is not None else None
                try:
                    first = ops.get(timeout=None if since is None else
                                    max(0.0, since + LAZY_SYNC_S - time.monotonic()))
                except queue.Empty:
                    assert sync_late is not None
                    sync_late(False)
                    continue
                if first is None:
                    if sync_late is not None:
                        sync_late(True)
                    return
                if first == _CHECKPOINT:
                    # PASSIVE: copies what no reader needs, never blocks a writer.
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    continue
                assert not isinstance(first, str)
                group = [first]
                stop = False
                while len(group) < GROUP_COMMIT_MAX:
                    try:
                        item = ops.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    if isinstance(item, str):  # a checkpoint: the next group asks again
                        continue
                    group.append(item)
                results = run_group(connection, group)
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    loop.call_soon_threadsafe(_settle, results)
                if stop:
                    if sync_late is not None:
                        sync_late(True)
                    return

    @staticmethod
    def _read_group(connection: sqlite3.Connection, group: list[Queued],
                    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            connection.execute("BEGIN")  # deferred: a read snapshot, no lock taken
            for operation, future, _ in group:
                try:
                    results.append((future, operation(connection), None))
                except Exception as exc:
                    results.append((future, None, exc))
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            return [(future, None, exc) for _, future, _ in group]
        return results

    def _sync_late(self, stopping: bool) -> None:
        """The store thread's fsync of commits nobody waited on (``run(durable=False)``),
        once the oldest is ``LAZY_SYNC_S`` old or the thread stops. A failure is tried
        again at the next turn (and fails the next durable operation meanwhile)."""
        if self._unsynced_since is None:
            return
        if stopping or time.monotonic() - self._unsynced_since >= LAZY_SYNC_S:
            with contextlib.suppress(sqlite3.Error):
                self._sync_wal()
                self._unsynced_since = None

    def _commit(self, connection: sqlite3.Connection, group: list[Queued],
                ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        changes = connection.total_changes
        try:
            connection.execute("BEGIN IMMEDIATE")
            for operation, future, _ in group:
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
            return [(future, None, exc) for _, future, _ in group]
        if connection.total_changes == changes:  # reads alone need no disk flush
            return results
        if any(durable for _, _, durable in group):
            try:
                self._sync_wal()
            except sqlite3.Error as exc:
                return [(future, None, exc) for _, future, _ in group]
            self._unsynced_since = None
        elif self._unsynced_since is None:
            self._unsynced_since = time.monotonic()
        else:
            self._sync_late(False)
        return results


#: Queued to the store thread: checkpoint the WAL (outside any transaction).
_CHECKPOINT: Final = "checkpoint"


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        if future.done():  # the caller was cancelled; the operation still committed
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
