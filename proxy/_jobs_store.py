"""The durable job queue and its records: jobs, batch lines, files and batches.

``JobStore`` is the one interface the job API and the runner use; this module
keeps it in SQLite (``_jobs_sqlite``). Rules that make a job run once to output:

* A job is *claimed* by one worker (an instance's runner) with a lease
  (``lease_until``); the worker renews its leases while it lives. A job whose lease
  ran out (its worker died: kill -9, a lost node) is claimed again by any worker.
* A result is written only by the worker holding the claim, in the same statement
  that ends the job (``state='running' AND worker=?``). A worker that lost its
  claim (it stalled past the lease) finds nothing to update, and its answer is
  dropped: the upstream may have been called twice, the job's record holds one
  answer.
* A batch's output and error files are written from the job rows, one line per
  row, once every row is final; rewriting them after a crash gives the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from skyroute.routing import BatchLine, BatchStatus, LineProblem, next_batch_status

from ._jobs_sqlite import SqliteRunner

#: Job states in the store. ``done`` holds an answer (status, response) or an error.
QUEUED: Final = "queued"
RUNNING: Final = "running"
DONE: Final = "done"
CANCELLED: Final = "cancelled"
EXPIRED: Final = "expired"


def new_id(prefix: str) -> str:
    return f"{prefix}{os.urandom(12).hex()}"


def body_digest(method: str, path: str, body: bytes | None) -> str:
    """What an ``Idempotency-Key`` is bound to: the same key with another request is refused."""
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    digest.update(body or b"")
    return digest.hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One claimed job, as the runner needs it."""

    id: str
    batch_id: str | None
    owner: str
    method: str
    path: str
    body: bytes | None
    tries: int


@dataclass(frozen=True, slots=True)
class Refill:
    """Jobs to claim in the same step that ends one (``finish``, ``retry_later``): the
    runner refills the slot the job frees without a claim of its own (one store round
    trip per job instead of two while the lane runs a few at a time)."""

    limit: int
    lease_s: float


_INSERT_JOB: Final = (
    "INSERT INTO jobs (id, owner, method, path, body, state, not_before, created_at, idem_key,"
    " body_hash, webhook, webhook_state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")


def _claim(db: sqlite3.Connection, worker: str, refill: Refill | None, now: float,
           ) -> list[Job]:
    """Up to ``refill.limit`` jobs due now (or whose worker's lease ran out), claimed by
    ``worker`` until ``now + refill.lease_s``."""
    if refill is None or refill.limit < 1:
        return []
    limit = refill.limit
    # Two index searches, not one OR: the queued side is read in not_before order
    # off the index, so a claim costs the same with a million jobs waiting.
    ids = [r[0] for r in db.execute(
        "SELECT id FROM jobs WHERE state=? AND lease_until<? LIMIT ?", (RUNNING, now, limit))]
    if len(ids) < limit:
        ids += [r[0] for r in db.execute(
            "SELECT id FROM jobs WHERE state=? AND not_before<=? ORDER BY not_before LIMIT ?",
            (QUEUED, now, limit - len(ids)))]
    if not ids:
        return []
    rows = db.execute(
        "UPDATE jobs SET state=?, worker=?, lease_until=?, started_at=? WHERE id IN"
        f" ({','.join('?' * len(ids))}) RETURNING id, batch_id, owner, method, path, body, tries",
        (RUNNING, worker, now + refill.lease_s, now, *ids)).fetchall()
    return [Job(id=r["id"], batch_id=r["batch_id"], owner=r["owner"], method=r["method"],
                path=r["path"], body=r["body"], tries=r["tries"]) for r in rows]


class IdempotencyConflict(Exception):
    """The ``Idempotency-Key`` was used before with a different request."""


class JobStore:
    """Jobs, files and batches under ``data_dir`` (see the module docstring)."""

    def __init__(self, data_dir: Path, *, defer_lane_syncs: bool = False) -> None:
        """``defer_lane_syncs``: the lane's own records (claims, renewals, a batch line's
        result or retry) resolve once committed and reach the disk within ``LAZY_SYNC_S``
        (``SqliteRunner.run(durable=False)``): for a jobs worker at idle priority, whose
        fsync after each commit set off the kernel's journal work at normal priority. A lane
        inline keeps them synced: waiting on the disk paces it, and without that pacing its
        CPU share drained more and raised clients' p99 more (bench/jobs.py)."""
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self._db = SqliteRunner(data_dir / "jobs.sqlite3")
        self._lane_durable = not defer_lane_syncs

    async def start(self) -> None:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        await self._db.start()

    async def aclose(self) -> None:
        await self._db.aclose()

    def group_commits(self) -> tuple[int, int]:
        """Group commits the accept path made on the event loop, and the submits they held."""
        return self._db.loop_commits, self._db.loop_rows

    # -- async jobs ---------------------------------------------------------------

    async def submit(self, *, owner: str, method: str, path: str, body: bytes | None,
                     idem_key: str | None, webhook: str | None, now: float,
                     ) -> tuple[dict[str, Any], bool]:
        """Queue one async request; with a known ``idem_key``, the job it made before.

        Returns:
            The job's record and whether it was created now.

        Raises:
            IdempotencyConflict: ``idem_key`` was used for another request.
        """
        digest = body_digest(method, path, body) if idem_key else None
        job_id = new_id("job_")
        row = (job_id, owner, method, path, body, QUEUED, now, now, idem_key, digest, webhook,
               "pending" if webhook else None)
        record = {"id": job_id, "owner": owner, "method": method, "path": path,
                  "state": QUEUED, "tries": 0, "created_at": now, "status": None,
                  "response": None, "error": None, "finished_at": None, "started_at": None}
        if idem_key is None:  # the accept path: a plain append, group-committed on the loop
            await self._db.insert(_INSERT_JOB, row)
            return record, True

        def op(db: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            known = db.execute("SELECT * FROM jobs WHERE owner=? AND idem_key=?",
                               (owner, idem_key)).fetchone()
            if known is not None:
                if known["body_hash"] != digest:
                    raise IdempotencyConflict(idem_key)
                return dict(known), False
            db.execute(_INSERT_JOB, row)
            return record, True

        return await self._db.run(op)

    async def job(self, job_id: str, owner: str) -> dict[str, Any] | None:
        def op(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT * FROM jobs WHERE id=? AND owner=? AND batch_id IS NULL",
                             (job_id, owner)).fetchone()
            return dict(row) if row is not None else None

        return await self._db.read(op)

    async def cancel_job(self, job_id: str, owner: str, *, now: float) -> dict[str, Any] | None:
        """Cancel a job not yet finished (a try in flight has its answer dropped)."""
        def op(db: sqlite3.Connection) -> dict[str, Any] | None:
            db.execute("UPDATE jobs SET state=?, finished_at=?, worker=NULL WHERE id=? AND "
                       "owner=? AND batch_id IS NULL AND state IN (?,?)",
                       (CANCELLED, now, job_id, owner, QUEUED, RUNNING))
            row = db.execute("SELECT * FROM jobs WHERE id=? AND owner=? AND batch_id IS NULL",
                             (job_id, owner)).fetchone()
            return dict(row) if row is not None else None

        return await self._db.run(op)

    # -- the runner's side ----------------------------------------------------------

    async def claim(self, *, worker: str, limit: int, lease_s: float, now: float) -> list[Job]:
        """Up to ``limit`` jobs due now (or whose worker's lease ran out), claimed by ``worker``."""
        return await self._db.run(lambda db: _claim(db, worker, Refill(limit, lease_s), now),
                                  durable=self._lane_durable)  # undone: claimed again

    async def renew(self, *, worker: str, lease_s: float, now: float) -> None:
        await self._db.run(lambda db: db.execute(
            "UPDATE jobs SET lease_until=? WHERE worker=? AND state=?",
            (now + lease_s, worker, RUNNING)), durable=self._lane_durable)

    async def finish(self, job: Job, *, worker: str, status: int | None, response: bytes | None,
                     error: str | None, now: float, refill: Refill | None = None,
                     ) -> tuple[bool, list[Job]]:
        """End ``job`` with its answer (False if ``worker`` no longer holds it), and claim
        ``refill``'s jobs in the same step."""
        def op(db: sqlite3.Connection) -> tuple[bool, list[Job]]:
            cursor = db.execute(
                "UPDATE jobs SET state=?, status=?, response=?, error=?, finished_at=?,"
                " tries=tries+1, worker=NULL WHERE id=? AND state=? AND worker=?",
                (DONE, status, response, error, now, job.id, RUNNING, worker))
            return cursor.rowcount == 1, _claim(db, worker, refill, now)

        # A batch line's result is seen only through the output file, which a durable step
        # writes from the rows: undone by a power cut, the line just runs again. An async
        # job's answer is read (and its webhook sent) as soon as this returns: on disk first.
        return await self._db.run(op, durable=self._lane_durable or job.batch_id is None)

    async def retry_later(self, job: Job, *, worker: str, at: float, error: str, now: float,
                          refill: Refill | None = None) -> tuple[bool, list[Job]]:
        """Queue ``job`` again, due at ``at`` (False if ``worker`` no longer holds it),
        and claim ``refill``'s jobs in the same step."""
        def op(db: sqlite3.Connection) -> tuple[bool, list[Job]]:
            cursor = db.execute(
                "UPDATE jobs SET state=?, not_before=?, error=?, tries=tries+1, worker=NULL"
                " WHERE id=? AND state=? AND worker=?",
                (QUEUED, at, error, job.id, RUNNING, worker))
            return cursor.rowcount == 1, _claim(db, worker, refill, now)

        return await self._db.run(op, durable=self._lane_durable)  # undone: tried again

    async def release(self, jobs: Iterable[Job], *, worker: str) -> None:
        """Give back claimed jobs not run (shutdown): due again at once, no try counted."""
        ids = [job.id for job in jobs]

        def op(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE jobs SET state=?, worker=NULL WHERE id=? AND state=? AND "
                           "worker=?", [(QUEUED, i, RUNNING, worker) for i in ids])

        if ids:
            await self._db.run(op, durable=self._lane_durable)  # undone: claimed later

    async def due_webhooks(self, *, limit: int, lease_s: float, now: float,
                           ) -> list[dict[str, Any]]:
        """Finished jobs whose webhook is due; each is held ``lease_s`` from other senders."""
        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "UPDATE jobs SET webhook_next=? WHERE id IN (SELECT id FROM jobs WHERE"
                " webhook_state='pending' AND state IN (?,?) AND"
                " (webhook_next IS NULL OR webhook_next<=?) LIMIT ?) RETURNING *",
                (now + lease_s, DONE, CANCELLED, now, limit)).fetchall()
            return [dict(r) for r in rows]

        return await self._db.run(op)

    async def webhook_sent(self, job_id: str, *, ok: bool, next_at: float | None) -> None:
        """Record a delivery: delivered, retried at ``next_at``, or given up (None)."""
        state = "delivered" if ok else "pending" if next_at is not None else "failed"
        await self._db.run(lambda db: db.execute(
            "UPDATE jobs SET webhook_state=?, webhook_tries=webhook_tries+1, webhook_next=?"
            " WHERE id=?", (state, next_at, job_id)))

    async def counts(self) -> dict[str, int]:
        """Jobs queued and running (for /health and the gauges); each an index search, so
        finished jobs, however many, cost nothing here."""
        def op(db: sqlite3.Connection) -> dict[str, int]:
            return {state: db.execute("SELECT count(*) FROM jobs WHERE state=?",
                                      (state,)).fetchone()[0] for state in (QUEUED, RUNNING)}

        return await self._db.read(op)

    async def oldest_queued(self) -> float | None:
        """When the job at the head of the queue (the first due) was accepted."""
        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT created_at FROM jobs WHERE state=? ORDER BY not_before"
                             " LIMIT 1", (QUEUED,)).fetchone()
            return row[0] if row is not None else None

        return await self._db.read(op)

    async def purge(self, *, ended_before: float) -> int:
        """Delete async jobs and batches (lines, output and error files) that ended before
        ``ended_before`` (``jobs.retention``); input files stay until their owner deletes them.

        Returns:
            How many jobs were deleted.
        """
        ended = ", ".join(f"{s.value}_at" for s in BatchStatus if s.is_terminal)

        def op(db: sqlite3.Connection) -> tuple[int, list[str]]:
            deleted = db.execute(
                "DELETE FROM jobs WHERE batch_id IS NULL AND state IN (?,?,?) AND finished_at<?"
                " AND (webhook_state IS NULL OR webhook_state!='pending')",
                (DONE, CANCELLED, EXPIRED, ended_before)).rowcount
            old = [r[0] for r in db.execute(
                f"SELECT id FROM batches WHERE coalesce({ended}) < ?", (ended_before,))]
            paths: list[str] = []
            for batch_id in old:
                deleted += db.execute("DELETE FROM jobs WHERE batch_id=?", (batch_id,)).rowcount
                paths += [r[0] for r in db.execute(
                    "DELETE FROM files WHERE id IN (?,?) RETURNING path",
                    (f"file-{batch_id}-output", f"file-{batch_id}-errors"))]
                db.execute("DELETE FROM batches WHERE id=?", (batch_id,))
            return deleted, paths

        deleted, paths = await self._db.run(op)
        for path in paths:
            Path(path).unlink(missing_ok=True)
        return deleted

    # -- files ------------------------------------------------------------------------

    async def add_file(self, *, file_id: str, owner: str, filename: str, purpose: str,
                       size: int, path: Path, now: float) -> dict[str, Any]:
        record = {"id": file_id, "owner": owner, "filename": filename, "purpose": purpose,
                  "bytes": size, "created_at": now, "path": str(path)}
        await self._db.run(lambda db: db.execute(
            "INSERT OR REPLACE INTO files (id, owner, filename, purpose, bytes, created_at, path)"
            " VALUES (:id,:owner,:filename,:purpose,:bytes,:created_at,:path)", record))
        return record

    async def file(self, file_id: str, owner: str) -> dict[str, Any] | None:
        def op(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT * FROM files WHERE id=? AND owner=?",
                             (file_id, owner)).fetchone()
            return dict(row) if row is not None else None

        return await self._db.read(op)

    async def files(self, owner: str, *, purpose: str | None, after: str | None, limit: int,
                    newest_first: bool = True) -> list[dict[str, Any]]:
        """One page of ``owner``'s files: up to ``limit`` after the file ``after`` (none if
        that id is unknown), by creation time; an index search, not a scan."""
        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            where, args = _page_after(db, "files", owner, after, newest_first)
            if where is None:
                return []
            if purpose:
                where, args = f"{where} AND purpose=?", [*args, purpose]
            return [dict(r) for r in db.execute(
                f"SELECT * FROM files WHERE {where} {_page_order(newest_first)} LIMIT ?",
                (*args, limit))]

        return await self._db.read(op)

    async def delete_file(self, file_id: str, owner: str) -> dict[str, Any] | None:
        def op(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("DELETE FROM files WHERE id=? AND owner=? RETURNING *",
                             (file_id, owner)).fetchone()
            return dict(row) if row is not None else None

        record = await self._db.run(op)
        if record is not None:
            Path(record["path"]).unlink(missing_ok=True)
        return record

    # -- batches -----------------------------------------------------------------------

    async def add_batch(self, *, owner: str, endpoint: str, input_file_id: str,
                        completion_window: str, metadata: dict[str, str] | None,
                        now: float, expires_s: float) -> dict[str, Any]:
        record = {"id": new_id("batch_"), "owner": owner, "status": BatchStatus.VALIDATING.value,
                  "endpoint": endpoint, "input_file_id": input_file_id,
                  "completion_window": completion_window,
                  "metadata": json.dumps(metadata) if metadata is not None else None,
                  "created_at": now, "expires_at": now + expires_s}
        await self._db.run(lambda db: db.execute(
            "INSERT INTO batches (id, owner, status, endpoint, input_file_id, completion_window,"
            " metadata, created_at, expires_at) VALUES (:id,:owner,:status,:endpoint,"
            ":input_file_id,:completion_window,:metadata,:created_at,:expires_at)", record))
        batch = await self.batch(record["id"], owner)
        assert batch is not None
        return batch

    async def batch(self, batch_id: str, owner: str | None) -> dict[str, Any] | None:
        """A batch with its ``request_counts``; ``owner`` None: whoever owns it."""
        def op(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT * FROM batches WHERE id=?" +
                             (" AND owner=?" if owner is not None else ""),
                             (batch_id, owner) if owner is not None else (batch_id,)).fetchone()
            return _with_counts(db, dict(row)) if row is not None else None

        return await self._db.read(op)

    async def batches(self, owner: str, *, after: str | None, limit: int,
                      ) -> list[dict[str, Any]]:
        """One page of ``owner``'s batches, newest first, as ``files`` pages."""
        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            where, args = _page_after(db, "batches", owner, after, True)
            if where is None:
                return []
            return [_with_counts(db, dict(r)) for r in db.execute(
                f"SELECT * FROM batches WHERE {where} {_page_order(True)} LIMIT ?",
                (*args, limit))]

        return await self._db.read(op)

    async def batches_in(self, statuses: Sequence[BatchStatus]) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(statuses))

        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return [dict(r) for r in db.execute(
                f"SELECT * FROM batches WHERE status IN ({marks})",
                [s.value for s in statuses])]

        return await self._db.read(op)

    async def move_batch(self, batch_id: str, old: BatchStatus, new: BatchStatus, *,
                         now: float, **fields: Any) -> bool:
        """``old -> new`` (with ``<new>_at`` and ``fields`` set); False if it was not ``old``.

        Raises:
            RoutingStateError: ``BATCH_TRANSITIONS`` has no such move.
        """
        next_batch_status(old, new)
        stamp = {BatchStatus.CANCELLING: "cancelling_at"}.get(new, f"{new.value}_at")
        sets = ", ".join(f"{name}=:{name}" for name in fields)
        values = {**fields, "id": batch_id, "old": old.value, "new": new.value, "now": now}

        def op(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                f"UPDATE batches SET status=:new, {stamp}=:now{', ' + sets if sets else ''}"
                " WHERE id=:id AND status=:old", values)
            if cursor.rowcount != 1:
                return False
            if new in (BatchStatus.CANCELLING, BatchStatus.EXPIRED):
                db.execute("UPDATE jobs SET state=?, finished_at=? WHERE batch_id=? AND state=?",
                           (CANCELLED if new is BatchStatus.CANCELLING else EXPIRED, now,
                            batch_id, QUEUED))
            if new is BatchStatus.EXPIRED:  # answers still in flight come too late
                db.execute("UPDATE jobs SET state=?, finished_at=?, worker=NULL WHERE "
                           "batch_id=? AND state=?", (EXPIRED, now, batch_id, RUNNING))
            return True

        return await self._db.run(op)

    async def start_batch(self, batch_id: str, owner: str, lines: Sequence[BatchLine],
                          problems: Sequence[LineProblem], *, endpoint: str, now: float,
                          ) -> bool:
        """Queue a validated batch's lines and move it to ``in_progress``, in one commit."""
        job_rows = [(new_id("batch_req_"), batch_id, line.line, line.custom_id, owner, "POST",
                     endpoint, line.body, QUEUED, now, now) for line in lines]
        problem_rows = [(new_id("batch_req_"), batch_id, p.line, p.custom_id, owner, "POST",
                         endpoint, DONE, now, now, now,
                         json.dumps({"code": p.code, "message": p.message, "line": p.line}))
                        for p in problems]

        def op(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE batches SET status=?, in_progress_at=?, total=? WHERE id=? AND status=?",
                (BatchStatus.IN_PROGRESS.value, now, len(lines) + len(problems), batch_id,
                 BatchStatus.VALIDATING.value))
            if cursor.rowcount != 1:
                return False  # cancelled meanwhile, or another instance started it
            db.executemany(
                "INSERT INTO jobs (id, batch_id, line, custom_id, owner, method, path, body,"
                " state, not_before, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", job_rows)
            db.executemany(
                "INSERT INTO jobs (id, batch_id, line, custom_id, owner, method, path, state,"
                " not_before, created_at, finished_at, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                problem_rows)
            return True

        return await self._db.run(op)

    async def cancel_queued_lines(self, batch_id: str, *, now: float) -> None:
        """A cancelling batch: lines queued again by a try that ended meanwhile stop too."""
        await self._db.run(lambda db: db.execute(
            "UPDATE jobs SET state=?, finished_at=? WHERE batch_id=? AND state=?",
            (CANCELLED, now, batch_id, QUEUED)))

    async def unfinished_lines(self, batch_id: str) -> int:
        def op(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT count(*) FROM jobs WHERE batch_id=? AND state IN (?,?)",
                             (batch_id, QUEUED, RUNNING)).fetchone()
            return int(row[0])

        return await self._db.read(op)

    async def batch_results(self, batch_id: str) -> list[dict[str, Any]]:
        """Every line of a batch, in input order, for the output and error files."""
        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return [dict(r) for r in db.execute(
                "SELECT id, line, custom_id, state, status, response, error FROM jobs"
                " WHERE batch_id=? ORDER BY line", (batch_id,))]

        return await self._db.read(op)


def _page_after(db: sqlite3.Connection, table: str, owner: str, after: str | None,
                newest_first: bool) -> tuple[str | None, list[Any]]:
    """The WHERE clause of a page of ``owner``'s rows after the row ``after`` (OpenAI's
    cursor); None when that row is not the owner's (the page is empty)."""
    if after is None:
        return "owner=?", [owner]
    row = db.execute(f"SELECT created_at, id FROM {table} WHERE id=? AND owner=?",
                     (after, owner)).fetchone()
    if row is None:
        return None, []
    # Row values walk the (owner, created_at, id) index from the cursor on.
    return f"owner=? AND (created_at, id) {'<' if newest_first else '>'} (?, ?)", \
        [owner, row[0], row[1]]


def _page_order(newest_first: bool) -> str:
    way = "DESC" if newest_first else "ASC"
    return f"ORDER BY created_at {way}, id {way}"


def _with_counts(db: sqlite3.Connection, batch: dict[str, Any]) -> dict[str, Any]:
    row = db.execute(
        "SELECT count(*) FILTER (WHERE state=? AND status BETWEEN 200 AND 299),"
        " count(*) FILTER (WHERE state=? AND (status IS NULL OR status NOT BETWEEN 200 AND 299))"
        " FROM jobs WHERE batch_id=?", (DONE, DONE, batch["id"])).fetchone()
    batch["request_counts"] = {"total": batch["total"], "completed": row[0], "failed": row[1]}
    return batch


def wall_clock() -> float:
    return time.time()
