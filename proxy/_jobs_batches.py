"""The batch driver: validates input files, queues lines, writes output and error files.

A pass over the store's unfinished batches, a few times a second (and whenever a
job finishes):

* ``validating``: the input file is read and checked line by line
  (``read_batch_line``); bad lines become error-file entries and the rest are queued,
  all in one commit with the move to ``in_progress``. A file invalid as a whole (not
  UTF-8, empty, no valid line, a ``custom_id`` twice, over ``MAX_LINES``) fails the
  batch with OpenAI's ``errors`` list.
* ``in_progress``: once no line is queued or running, ``finalizing``; past
  ``expires_at`` (the 24h completion window), ``expired``.
* ``finalizing``, ``cancelling`` (once no line runs): the output and error files
  are written from the job rows, then ``completed`` / ``cancelled``. The files are a
  function of the rows, so a crash here only means they are written again.

Every move is conditional on the status read (``move_batch``), so instances sharing
the store can run passes at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
from aiohttp import web
from skyroute.routing import BatchLine, BatchStatus, LineProblem, read_batch_line

from ._jobs_runner import pause
from ._jobs_store import JobStore
from ._jobs_views import result_line

if TYPE_CHECKING:
    from ._jobs_runner import JobsService

log = structlog.get_logger("skyroute.jobs")

#: OpenAI's limit on requests in one batch.
MAX_LINES: Final = 50_000
#: Problems listed in a failed batch's ``errors`` at most.
MAX_LISTED_ERRORS: Final = 20
DRIVE_INTERVAL_S: Final = 0.2
_S = BatchStatus


async def batch_driver(app: web.Application, service: JobsService) -> None:
    while True:
        try:
            await drive_batches(service)
        except Exception:  # a bug or a full disk: log it, keep the other batches moving
            log.exception("batch_pass_failed")
        await pause(DRIVE_INTERVAL_S)


async def drive_batches(service: JobsService) -> None:
    store = service.store
    for batch in await store.batches_in((_S.VALIDATING, _S.IN_PROGRESS, _S.FINALIZING,
                                         _S.CANCELLING)):
        status, now = _S(batch["status"]), service.wall()
        if status is _S.VALIDATING:
            await _validate(service, batch)
        elif status is _S.IN_PROGRESS:
            if now >= batch["expires_at"]:
                await _end(service, batch, _S.IN_PROGRESS, _S.EXPIRED)
            elif await store.unfinished_lines(batch["id"]) == 0:
                await store.move_batch(batch["id"], _S.IN_PROGRESS, _S.FINALIZING, now=now)
                await _end(service, batch, _S.FINALIZING, _S.COMPLETED)
        elif status is _S.FINALIZING:
            await _end(service, batch, _S.FINALIZING, _S.COMPLETED)
        else:
            await store.cancel_queued_lines(batch["id"], now=now)
            if await store.unfinished_lines(batch["id"]) == 0:
                await _end(service, batch, _S.CANCELLING, _S.CANCELLED)


async def _validate(service: JobsService, batch: dict[str, Any]) -> None:
    store = service.store
    record = await store.file(batch["input_file_id"], batch["owner"])
    now = time.time()
    if record is None:
        await _fail(store, batch, [{"code": "invalid_file", "message": f"the input file "
                                    f"{batch['input_file_id']} no longer exists", "line": None}])
        return
    lines, problems, whole = await asyncio.to_thread(
        check_input, Path(record["path"]), batch["endpoint"])
    if whole:
        await _fail(store, batch, whole)
        return
    if await store.start_batch(batch["id"], batch["owner"], lines, problems,
                               endpoint=batch["endpoint"], now=now):
        service.metrics.accepted.labels("line").inc(len(lines))
        log.info("batch_started", batch_id=batch["id"], lines=len(lines),
                 invalid_lines=len(problems))
        service.new_work()


def check_input(path: Path, endpoint: str,
                ) -> tuple[list[BatchLine], list[LineProblem], list[dict[str, Any]]]:
    """The valid lines, the bad ones, and what makes the whole file invalid (if anything)."""
    lines: list[BatchLine] = []
    problems: list[LineProblem] = []
    try:
        raw = path.read_bytes()
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [], [{"code": "invalid_file", "message": f"the input file is not UTF-8 "
                         f"text ({exc}); a batch file is JSONL, one request per line",
                         "line": None}]
    numbered = [(i, text) for i, text in enumerate(raw.split(b"\n"), 1) if text.strip()]
    if not numbered:
        return [], [], [{"code": "empty_file", "message": "the input file has no request lines",
                         "line": None}]
    if len(numbered) > MAX_LINES:
        return [], [], [{"code": "too_many_requests", "message": f"the input file has "
                         f"{len(numbered)} requests; a batch holds at most {MAX_LINES}",
                         "line": None}]
    seen: dict[str, int] = {}
    whole: list[dict[str, Any]] = []
    for number, text in numbered:
        checked = read_batch_line(text, line=number, endpoint=endpoint)
        custom_id = checked.custom_id
        if custom_id is not None and custom_id in seen:
            whole.append({"code": "duplicate_custom_id", "line": number,
                          "message": f"line {number}: custom_id {custom_id!r} is already used "
                                     f"on line {seen[custom_id]}; each must be unique"})
            continue
        if custom_id is not None:
            seen[custom_id] = number
        (lines if isinstance(checked, BatchLine) else problems).append(checked)  # type: ignore[arg-type]
    if not lines and not whole:
        whole = [{"code": p.code, "message": p.message, "line": p.line} for p in problems]
    return lines, problems, whole[:MAX_LISTED_ERRORS]


async def _fail(store: JobStore, batch: dict[str, Any], errors: list[dict[str, Any]]) -> None:
    body = {"object": "list", "data": [{**e, "param": None} for e in errors]}
    if await store.move_batch(batch["id"], _S.VALIDATING, _S.FAILED, now=time.time(),
                              errors=json.dumps(body)):
        log.info("batch_failed", batch_id=batch["id"], errors=len(errors))


async def _end(service: JobsService, batch: dict[str, Any], old: BatchStatus,
               new: BatchStatus) -> None:
    """Write the output and error files, then move ``old -> new`` naming them."""
    store = service.store
    rows = await store.batch_results(batch["id"])
    if new is _S.EXPIRED:  # what has not run by now never will
        rows = [r if r["state"] in ("done", "cancelled") else {**r, "state": "expired"}
                for r in rows]
    out_id, err_id = f"file-{batch['id']}-output", f"file-{batch['id']}-errors"
    written = await asyncio.to_thread(_write_results, rows, store.files_dir, out_id, err_id)
    now = time.time()
    ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
    for file_id, size, kind in written:
        await store.add_file(file_id=file_id, owner=batch["owner"],
                             filename=f"{batch['id']}_{kind}.jsonl", purpose="batch_output",
                             size=size, path=store.files_dir / file_id, now=now)
        ids[f"{kind}_file_id"] = file_id
    if await store.move_batch(batch["id"], old, new, now=now, **ids):
        service.metrics.batches.labels(new.value).inc()
        log.info("batch_ended", batch_id=batch["id"], status=new.value, **ids)


def _write_results(rows: list[dict[str, Any]], directory: Path, out_id: str, err_id: str,
                   ) -> list[tuple[str, int, str]]:
    good: list[bytes] = []
    bad: list[bytes] = []
    for row in rows:
        ok, line = result_line(row)
        (good if ok else bad).append(line)
    written = []
    for file_id, lines, kind in ((out_id, good, "output"), (err_id, bad, "error")):
        if not lines:
            continue
        data = b"".join(lines)
        tmp = directory / f".{file_id}.tmp"
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, directory / file_id)
        written.append((file_id, len(data), kind))
    return written
