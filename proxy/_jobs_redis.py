"""The shared job store: Redis Streams with a consumer group, for several instances.

The same operations as the SQLite ``JobStore`` (the runner and the API cannot tell
them apart), kept in Redis so every instance naming ``jobs.redis`` shares one queue:

* A job is a hash ``{prefix}job:{id}``; a due job has one entry in the stream
  ``{prefix}stream``, read by the consumer group ``runners`` (each instance is a
  consumer). A retry waits in the sorted set ``{prefix}delayed`` (score: when it is
  due) and is moved back into the stream when due.
* Claiming takes new entries (``XREADGROUP``) and the entries of a dead consumer
  idle past ``jobs.visibility_timeout`` (``XAUTOCLAIM``), due retries first, and marks
  each job ``running`` by this worker: all in one script (``_CLAIM``), one round trip
  per claim however many jobs it takes. The scripts that end a job (``_FINISH``,
  ``_RETRY``) claim in the same step the jobs that refill the slot it frees (the
  runner's ``Refill``), so a lane running a few jobs at a time beside clients makes one
  round trip per job, not two. A live instance resets its entries' idle time every
  third of that (``XCLAIM ... JUSTID``).
* Every state change is a Lua script, so it is atomic: a result is written only
  while the job is ``running`` by the worker writing it (a worker that lost its claim
  writes nothing), and the stream entry is acknowledged in the same step. Output
  files come from the job hashes, so each ``custom_id`` is answered once.
* Uploaded files stay under ``data_dir`` (their records are in Redis): instances on
  several hosts need that directory on shared storage (ReadWriteMany).

Submits group-commit as SQLite's do: every submit waiting goes in one ``MULTI``/``EXEC``
pipeline (one round trip, one AOF write), and those arriving while it is in flight go
in the next; each answers 202 once its pipeline is acknowledged. Finished jobs are
grouped the same way: the results waiting go in one ``_FINISH`` call (each job still
checked and ended on its own, all of them atomically), each ``finish`` returning once
that call is acknowledged. A redis-py command costs 130-230 us of CPU (its pool,
retry and observability wrappers around each one), more than Redis spends on it, so
the round trips per job are what the lane's CPU per job is made of.

The scripts build job keys from the prefix (``{prefix}job:{id}``) rather than taking
them all as ``KEYS``: a claim cannot know which jobs it takes. Redis Cluster would
need the prefix in one hash slot (``{tag}``); a single Redis or a replica set is fine.

Durability is Redis's: run it with ``appendonly yes`` (``appendfsync everysec`` loses
at most a second of accepted jobs on a crash of the Redis host; ``always`` none).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from skyroute.routing import BatchLine, BatchStatus, LineProblem, next_batch_status

from ._jobs_store import (
    CANCELLED,
    DONE,
    EXPIRED,
    QUEUED,
    RUNNING,
    IdempotencyConflict,
    Job,
    Refill,
    body_digest,
    new_id,
)

GROUP: Final = "runners"
#: Due retries a claim moves back into the stream at most (the rest at the next claim).
MOVE_DUE_AT_ONCE: Final = 1000
#: Ids read at once from an owner's sorted set of files or batches while paging.
PAGE_READ: Final = 100
_INTS: Final = frozenset({"line", "tries", "status", "webhook_tries", "total"})
_FLOATS: Final = frozenset({"not_before", "created_at", "started_at", "finished_at",
                            "webhook_next", "in_progress_at", "expires_at", "finalizing_at",
                            "completed_at", "failed_at", "expired_at", "cancelling_at",
                            "cancelled_at"})
_BYTES: Final = frozenset({"body", "response"})
_TERMINAL: Final = frozenset(s.value for s in BatchStatus if s.is_terminal)

#: ``claim(...)`` takes up to ``limit`` (> 0) jobs for ``worker``: due retries back into
#: the stream, then entries of dead consumers idle past ``min_idle`` ms (``XAUTOCLAIM``
#: from ``cursor``), then new ones; each job still queued (or running: a dead worker's)
#: becomes running by this worker, an entry whose job ended (cancelled) is acknowledged
#: and dropped. Returns {cursor, entry, fields, entry, ...}. Shared by the scripts that
#: claim: ``_CLAIM`` alone, and ``_FINISH``/``_RETRY``, which refill the slot they free.
_CLAIM_FUNCTION = """
local function claim(stream, delayed, group, worker, now, limit, min_idle, cursor, prefix,
                     most_due)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, most_due)
  for _, id in ipairs(due) do
    redis.call('ZREM', delayed, id)
    redis.call('XADD', stream, '*', 'job', id)
  end
  local auto = redis.call('XAUTOCLAIM', stream, group, worker, min_idle, cursor, 'COUNT', limit)
  local entries = {}
  for _, e in ipairs(auto[2]) do
    if e[2] then entries[#entries + 1] = e end  -- Redis 6.2: a deleted entry has no fields
  end
  if #entries < limit then
    local read = redis.call('XREADGROUP', 'GROUP', group, worker, 'COUNT', limit - #entries,
                            'STREAMS', stream, '>')
    if read then
      for _, e in ipairs(read[1][2]) do entries[#entries + 1] = e end
    end
  end
  local out = {auto[1]}
  for _, e in ipairs(entries) do
    local id
    for i = 1, #e[2], 2 do
      if e[2][i] == 'job' then id = e[2][i + 1] end
    end
    local st = id and redis.call('HGET', prefix .. id, 'state')
    if st == 'queued' or st == 'running' then
      local key = prefix .. id
      redis.call('HSET', key, 'state', 'running', 'worker', worker, 'started_at', now,
                 'entry', e[1])
      out[#out + 1] = e[1]
      out[#out + 1] = redis.call('HMGET', key, 'id', 'batch_id', 'owner', 'method', 'path',
                                 'body', 'tries')
    else
      redis.call('XACK', stream, group, e[1])
      redis.call('XDEL', stream, e[1])
    end
  end
  return out
end
"""
#: Claims jobs (``claim``). KEYS: stream, delayed. ARGV: group, then the refill's six:
#: worker, now, limit, min idle ms, autoclaim cursor, job key prefix; then most due
#: retries moved.
_CLAIM = _CLAIM_FUNCTION + """
return claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5],
             ARGV[6], ARGV[7], ARGV[8])
"""
#: Whether ``job`` is running by ``worker``; if so its stream entry is acknowledged and
#: dropped: the job leaves the queue. And ``refill``: what a script that ends a job
#: claims in the same step (``claim`` with ARGV[i..i+6], nothing when its limit is 0).
_ENDING = _CLAIM_FUNCTION + """
local function owned(job, stream, group, worker)
  if redis.call('HGET', job, 'state') ~= 'running' or
     redis.call('HGET', job, 'worker') ~= worker then return false end
  local entry = redis.call('HGET', job, 'entry')
  if entry and entry ~= '' then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
  return true
end
local function refill(stream, delayed, group, i)
  local limit = tonumber(ARGV[i + 2])
  if limit < 1 then return {} end
  return claim(stream, delayed, group, ARGV[i], ARGV[i + 1], limit, ARGV[i + 3],
               ARGV[i + 4], ARGV[i + 5], ARGV[i + 6])
end
"""
#: Ends each job with its result if its worker still runs it, each as it would alone,
#: then claims the refill. KEYS: stream, delayed, webhooks, count done, then 4 per job:
#: job, batch open, completed, failed. ARGV: group, retention seconds, the
#: refill's seven (see ``_CLAIM``), then 6 per job: worker, status, response, error, now,
#: '1' if it succeeded. Returns {1 per job ended or 0 per job its worker no longer held,
#: the refill's claim}.
_FINISH = _ENDING + """
local ended = {}
for j = 0, (#KEYS - 4) / 4 - 1 do
  local k, a = 4 + j * 4, 9 + j * 6
  local job = KEYS[k + 1]
  if not owned(job, KEYS[1], ARGV[1], ARGV[a + 1]) then
    ended[j + 1] = 0
  else
    local now = ARGV[a + 5]
    redis.call('HSET', job, 'state', 'done', 'status', ARGV[a + 2], 'response', ARGV[a + 3],
               'error', ARGV[a + 4], 'finished_at', now, 'worker', '', 'entry', '')
    redis.call('HINCRBY', job, 'tries', 1)
    redis.call('INCR', KEYS[4])
    local batch_id = redis.call('HGET', job, 'batch_id')
    if batch_id ~= '' then
      redis.call('DECR', KEYS[k + 2])
      if ARGV[a + 6] == '1' then redis.call('INCR', KEYS[k + 3])
      else redis.call('INCR', KEYS[k + 4]) end
    end
    if redis.call('HGET', job, 'webhook_state') == 'pending' then
      redis.call('ZADD', KEYS[3], now, redis.call('HGET', job, 'id'))
    end
    if batch_id == '' then
      redis.call('EXPIRE', job, ARGV[2])  -- jobs.retention (a batch's lines: when it ends)
    end
    ended[j + 1] = 1
  end
end
return {ended, refill(KEYS[1], KEYS[2], ARGV[1], 3)}
"""
#: Puts the job back in the queue, due at ARGV[3] (a try counted if ARGV[5] is '1'), if
#: its worker still runs it; then claims the refill. KEYS: job, stream, delayed. ARGV:
#: group, worker, due, error, count a try, then the refill's seven (see ``_CLAIM``).
#: Returns {1, or 0 if the worker no longer held it; the refill's claim}.
_RETRY = _ENDING + """
local ok = 0
if owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'not_before', ARGV[3], 'error', ARGV[4],
             'worker', '', 'entry', '')
  if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[1], 'tries', 1) end
  redis.call('ZADD', KEYS[3], ARGV[3], redis.call('HGET', KEYS[1], 'id'))
  ok = 1
end
return {ok, refill(KEYS[2], KEYS[3], ARGV[1], 6)}
"""
_CANCEL_JOB = """
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'queued' and st ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1], 'worker', '')
redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
redis.call('INCR', KEYS[3])
if redis.call('HGET', KEYS[1], 'webhook_state') == 'pending' then
  redis.call('ZADD', KEYS[4], ARGV[1], redis.call('HGET', KEYS[1], 'id'))
end
return 1
"""
# KEYS: batch, lines, open, active, delayed, counter of line_state
# ARGV: old, new, stamp, now, line_state, also_running, prefix, terminal, batch id,
#       retention seconds, k, v, ...
_MOVE_BATCH = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])
for i = 11, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[8] == '1' then
  redis.call('SREM', KEYS[4], ARGV[9])
  for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    redis.call('EXPIRE', ARGV[7] .. 'job:' .. id, ARGV[10])
  end
  redis.call('EXPIRE', KEYS[2], ARGV[10])
end
if ARGV[5] ~= '' then
  for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    local k = ARGV[7] .. 'job:' .. id
    local st = redis.call('HGET', k, 'state')
    if st == 'queued' or (ARGV[6] == '1' and st == 'running') then
      redis.call('HSET', k, 'state', ARGV[5], 'finished_at', ARGV[4], 'worker', '')
      redis.call('ZREM', KEYS[5], id)
      redis.call('DECR', KEYS[3])
      redis.call('INCR', KEYS[6])
    end
  end
end
return 1
"""
_DUE_WEBHOOKS = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return ids
"""


def _value(name: str, raw: bytes, *, batch: bool = False) -> Any:
    if name in _BYTES:
        return raw or None
    text = raw.decode()
    if text == "":
        return None
    if name in _INTS and not (batch and name == "status"):  # a batch's status is a word
        return int(text)
    if name in _FLOATS:
        return float(text)
    return text


def _record(raw: dict[bytes, bytes], *, batch: bool = False) -> dict[str, Any]:
    return {k.decode(): _value(k.decode(), v, batch=batch) for k, v in raw.items()}


def _flat(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: "" if v is None else v for k, v in fields.items()}


Item = TypeVar("Item")
Result = TypeVar("Result")


class _Grouped(Generic[Item, Result]):
    """Calls that go to Redis together: every one waiting in one round trip (``send``,
    which answers each in order), and those arriving while it is in flight in the next.

    A failed round trip fails every call of its group with that error.
    """

    def __init__(self, send: Callable[[list[Item]], Awaitable[Sequence[Result]]]) -> None:
        self._send = send
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, done))
        if self._sender is None:
            self._sender = loop.create_task(self._send_waiting())
        return await done

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    results = await self._send([item for item, _ in group])
                except BaseException as exc:
                    for _, done in group:
                        if not done.done():
                            done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for (_, done), result in zip(group, results, strict=True):
                        if not done.done():
                            done.set_result(result)
        finally:
            self._sender = None


class RedisJobStore:
    """Jobs, batches and file records in Redis; file bytes under ``data_dir``."""

    def __init__(self, url: str, prefix: str, data_dir: Path, *, retention_s: float) -> None:
        self.retention_s = retention_s
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self._p = prefix
        self._redis = aioredis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                        health_check_interval=30)
        self._stream = f"{prefix}stream"
        self._delayed = f"{prefix}delayed"
        self._webhooks = f"{prefix}webhooks"
        self._active = f"{prefix}batches:active"
        self._entries: dict[str, str] = {}  # job id -> stream entry, of jobs this process runs
        self._autoclaim_from = "0-0"  # XAUTOCLAIM walks the pending list a page per claim
        self._submits: _Grouped[tuple[str, dict[str, Any]], None] = _Grouped(
            self._send_submits)
        self._finishes: _Grouped[tuple[Job, list[Any], Refill | None],
                                 tuple[bool, list[Job]]] = _Grouped(self._send_finishes)
        r = self._redis
        self._claim, self._finish, self._retry = (r.register_script(_CLAIM),
                                                  r.register_script(_FINISH),
                                                  r.register_script(_RETRY))
        self._cancel = r.register_script(_CANCEL_JOB)
        self._move_batch = r.register_script(_MOVE_BATCH)
        self._due_webhooks = r.register_script(_DUE_WEBHOOKS)

    def _job(self, job_id: str) -> str:
        return f"{self._p}job:{job_id}"

    def _batch(self, batch_id: str, part: str = "") -> str:
        return f"{self._p}batch:{batch_id}{':' + part if part else ''}"

    async def start(self) -> None:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def aclose(self) -> None:
        await self._redis.aclose()

    # -- async jobs ---------------------------------------------------------------------

    async def submit(self, *, owner: str, method: str, path: str, body: bytes | None,
                     idem_key: str | None, webhook: str | None, now: float,
                     ) -> tuple[dict[str, Any], bool]:
        digest = body_digest(method, path, body) if idem_key else None
        job_id = new_id("job_")
        if idem_key is not None:
            idem = f"{self._p}idem:{owner}:{idem_key}"
            if not await self._redis.set(idem, job_id, nx=True):
                known = (await self._redis.get(idem) or b"").decode()
                record = await self._get(known)
                if record is None:  # written by a submit that has not finished yet
                    raise IdempotencyConflict(idem_key)
                if record["body_hash"] != digest:
                    raise IdempotencyConflict(idem_key)
                return record, False
        record = {"id": job_id, "batch_id": None, "owner": owner, "method": method,
                  "path": path, "body": body, "state": QUEUED, "tries": 0, "not_before": now,
                  "created_at": now, "idem_key": idem_key, "body_hash": digest,
                  "webhook": webhook, "webhook_state": "pending" if webhook else None,
                  "webhook_tries": 0, "status": None, "response": None, "error": None,
                  "finished_at": None, "started_at": None, "worker": None, "entry": None}
        await self._submits.call((job_id, record))
        return record, True

    async def _send_submits(self, group: list[tuple[str, dict[str, Any]]]) -> list[None]:
        """Every waiting submit in one transaction."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for job_id, record in group:
                pipe.hset(self._job(job_id), mapping=_flat(record))
                pipe.xadd(self._stream, {"job": job_id})
            await pipe.execute()
        return [None] * len(group)

    async def _get(self, job_id: str) -> dict[str, Any] | None:
        raw = await self._redis.hgetall(self._job(job_id))
        return _record(raw) if raw else None

    async def job(self, job_id: str, owner: str) -> dict[str, Any] | None:
        record = await self._get(job_id)
        if record is None or record["owner"] != (owner or None) or record["batch_id"]:
            return None
        return record

    async def cancel_job(self, job_id: str, owner: str, *, now: float) -> dict[str, Any] | None:
        if await self.job(job_id, owner) is None:
            return None
        await self._cancel(keys=[self._job(job_id), self._delayed, f"{self._p}count:cancelled",
                                 self._webhooks], args=[now])
        return await self.job(job_id, owner)

    # -- the runner's side ------------------------------------------------------------------

    async def claim(self, *, worker: str, limit: int, lease_s: float, now: float) -> list[Job]:
        return self._claimed(await self._claim(
            keys=[self._stream, self._delayed],
            args=[GROUP, *self._refill_args(worker, Refill(limit, lease_s), now)]))

    def _refill_args(self, worker: str, refill: Refill | None, now: float) -> list[Any]:
        """The seven arguments of the scripts' ``claim`` (``_CLAIM``)."""
        limit, lease_s = (refill.limit, refill.lease_s) if refill is not None else (0, 0.0)
        return [worker, now, limit, int(lease_s * 1000), self._autoclaim_from,
                f"{self._p}job:", MOVE_DUE_AT_ONCE]

    def _claimed(self, out: list[Any]) -> list[Job]:
        """The jobs a script's ``claim`` took (nothing if it claimed none)."""
        if not out:
            return []
        cursor, *taken = out
        self._autoclaim_from = cursor.decode()
        jobs = []
        for entry, row in zip(taken[::2], taken[1::2], strict=True):
            jid, batch_id, owner, method, path, body, tries = row
            job = Job(id=jid.decode(), batch_id=batch_id.decode() or None,
                      owner=owner.decode(), method=method.decode(), path=path.decode(),
                      body=body or None, tries=int(tries))
            self._entries[job.id] = entry.decode()
            jobs.append(job)
        return jobs

    async def renew(self, *, worker: str, lease_s: float, now: float) -> None:
        entries = list(self._entries.values())
        if entries:
            await self._redis.xclaim(self._stream, GROUP, worker, 0, entries, justid=True)

    async def finish(self, job: Job, *, worker: str, status: int | None, response: bytes | None,
                     error: str | None, now: float, refill: Refill | None = None,
                     ) -> tuple[bool, list[Job]]:
        self._entries.pop(job.id, None)
        ok = status is not None and 200 <= status < 300 and not error
        return await self._finishes.call((job, [
            worker, "" if status is None else status, response or b"", error or "", now,
            "1" if ok else "0"], refill))

    async def _send_finishes(self, group: list[tuple[Job, list[Any], Refill | None]],
                             ) -> list[tuple[bool, list[Job]]]:
        """The results waiting in one script call (``_FINISH``), with one claim for all
        their refills, shared out in order."""
        keys = [self._stream, self._delayed, self._webhooks, f"{self._p}count:done"]
        args: list[Any] = []
        for job, values, _ in group:
            batch = job.batch_id or "-"
            keys += [self._job(job.id), self._batch(batch, "open"),
                     self._batch(batch, "completed"), self._batch(batch, "failed")]
            args += values
        refills = [r for _, _, r in group if r is not None and r.limit > 0]
        together = Refill(sum(r.limit for r in refills), max(r.lease_s for r in refills)) \
            if refills else None
        worker, now = group[0][1][0], max(values[4] for _, values, _ in group)
        ended, out = await self._finish(keys=keys, args=[
            GROUP, int(self.retention_s), *self._refill_args(worker, together, now), *args])
        claimed = self._claimed(out)
        results = []
        for e, (_, _, refill) in zip(ended, group, strict=True):
            take = refill.limit if refill is not None else 0
            results.append((bool(e), claimed[:take]))
            del claimed[:take]
        return results

    async def retry_later(self, job: Job, *, worker: str, at: float, error: str, now: float,
                          refill: Refill | None = None) -> tuple[bool, list[Job]]:
        self._entries.pop(job.id, None)
        ok, out = await self._retry(
            keys=[self._job(job.id), self._stream, self._delayed],
            args=[GROUP, worker, at, error, "1", *self._refill_args(worker, refill, now)])
        return bool(ok), self._claimed(out)

    async def release(self, jobs: Iterable[Job], *, worker: str) -> None:
        for job in jobs:
            self._entries.pop(job.id, None)
            await self._retry(keys=[self._job(job.id), self._stream, self._delayed],
                              args=[GROUP, worker, 0, "", "0",
                                    *self._refill_args(worker, None, 0)])

    async def due_webhooks(self, *, limit: int, lease_s: float, now: float,
                           ) -> list[dict[str, Any]]:
        ids = await self._due_webhooks(keys=[self._webhooks], args=[now, limit, now + lease_s])
        records = [await self._get(i.decode()) for i in ids]
        return [r for r in records if r is not None]

    async def webhook_sent(self, job_id: str, *, ok: bool, next_at: float | None) -> None:
        state = "delivered" if ok else "pending" if next_at is not None else "failed"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._job(job_id), mapping={"webhook_state": state,
                                                  "webhook_next": next_at or ""})
            pipe.hincrby(self._job(job_id), "webhook_tries", 1)
            if next_at is not None and not ok:
                pipe.zadd(self._webhooks, {job_id: next_at})
            else:
                pipe.zrem(self._webhooks, job_id)
            await pipe.execute()

    async def purge(self, *, ended_before: float) -> int:
        """Records in Redis expire by themselves (``EXPIRE`` when they end): nothing to do."""
        return 0

    async def counts(self) -> dict[str, int]:
        pending = await self._redis.xpending(self._stream, GROUP)
        length = await self._redis.xlen(self._stream)
        delayed = await self._redis.zcard(self._delayed)
        running = int(pending["pending"])
        return {QUEUED: max(0, length - running) + delayed, RUNNING: running}

    async def oldest_queued(self) -> float | None:
        first = await self._redis.xrange(self._stream, count=1)
        return int(first[0][0].split(b"-")[0]) / 1000 if first else None

    # -- files -------------------------------------------------------------------------

    async def add_file(self, *, file_id: str, owner: str, filename: str, purpose: str,
                       size: int, path: Path, now: float) -> dict[str, Any]:
        record = {"id": file_id, "owner": owner, "filename": filename, "purpose": purpose,
                  "bytes": size, "created_at": now, "path": str(path)}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(f"{self._p}file:{file_id}", mapping=record)
            pipe.zadd(f"{self._p}files:{owner}", {file_id: now})
            await pipe.execute()
        return record

    async def file(self, file_id: str, owner: str) -> dict[str, Any] | None:
        raw = await self._redis.hgetall(f"{self._p}file:{file_id}")
        if not raw:
            return None
        record = {k.decode(): v.decode() for k, v in raw.items()}
        if record["owner"] != owner:
            return None
        return {**record, "bytes": int(record["bytes"]), "created_at": float(record["created_at"])}

    async def files(self, owner: str, *, purpose: str | None, after: str | None, limit: int,
                    newest_first: bool = True) -> list[dict[str, Any]]:
        """One page of ``owner``'s files (see ``JobStore.files``): the ids come from the
        owner's sorted set by rank, a page at a time, never the whole set."""
        out: list[dict[str, Any]] = []
        async for file_id in self._page(f"{self._p}files:{owner}", after, newest_first):
            record = await self.file(file_id, owner)
            if record is not None and (purpose is None or record["purpose"] == purpose):
                out.append(record)
                if len(out) == limit:
                    break
        return out

    async def _page(self, key: str, after: str | None, newest_first: bool,
                    ) -> AsyncIterator[str]:
        """Members of the sorted set ``key`` after ``after`` (none if it is not there), by
        score (creation time), read ``PAGE_READ`` at a time."""
        rank_of = self._redis.zrevrank if newest_first else self._redis.zrank
        read = self._redis.zrevrange if newest_first else self._redis.zrange
        start = 0
        if after is not None:
            rank = await rank_of(key, after)
            if rank is None:
                return
            start = int(rank) + 1
        while True:
            ids = await read(key, start, start + PAGE_READ - 1)
            for member in ids:
                yield member.decode()
            if len(ids) < PAGE_READ:
                return
            start += PAGE_READ

    async def delete_file(self, file_id: str, owner: str) -> dict[str, Any] | None:
        record = await self.file(file_id, owner)
        if record is None:
            return None
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{self._p}file:{file_id}")
            pipe.zrem(f"{self._p}files:{owner}", file_id)
            await pipe.execute()
        Path(record["path"]).unlink(missing_ok=True)
        return record

    # -- batches ------------------------------------------------------------------------

    async def add_batch(self, *, owner: str, endpoint: str, input_file_id: str,
                        completion_window: str, metadata: dict[str, str] | None,
                        now: float, expires_s: float) -> dict[str, Any]:
        batch_id = new_id("batch_")
        record = {"id": batch_id, "owner": owner, "status": BatchStatus.VALIDATING.value,
                  "endpoint": endpoint, "input_file_id": input_file_id,
                  "completion_window": completion_window,
                  "metadata": json.dumps(metadata) if metadata is not None else "",
                  "created_at": now, "expires_at": now + expires_s, "total": 0}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._batch(batch_id), mapping=record)
            pipe.zadd(f"{self._p}batches:{owner}", {batch_id: now})
            pipe.sadd(self._active, batch_id)
            await pipe.execute()
        batch = await self.batch(batch_id, owner)
        assert batch is not None
        return batch

    async def batch(self, batch_id: str, owner: str | None) -> dict[str, Any] | None:
        raw = await self._redis.hgetall(self._batch(batch_id))
        if not raw:
            return None
        record = _record(raw, batch=True)
        record["owner"] = record["owner"] or ""
        if owner is not None and record["owner"] != owner:
            return None
        for name in ("metadata", "errors", "output_file_id", "error_file_id", "in_progress_at",
                     "finalizing_at", "completed_at", "failed_at", "expired_at",
                     "cancelling_at", "cancelled_at"):
            record.setdefault(name, None)
        completed, failed = await self._redis.mget(
            [self._batch(batch_id, "completed"), self._batch(batch_id, "failed")])
        record["request_counts"] = {"total": record["total"] or 0,
                                    "completed": int(completed or 0), "failed": int(failed or 0)}
        return record

    async def batches(self, owner: str, *, after: str | None, limit: int,
                      ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async for batch_id in self._page(f"{self._p}batches:{owner}", after, True):
            record = await self.batch(batch_id, owner)
            if record is not None:
                out.append(record)
                if len(out) == limit:
                    break
        return out

    async def batches_in(self, statuses: Sequence[BatchStatus]) -> list[dict[str, Any]]:
        wanted = {s.value for s in statuses}
        ids = [i.decode() for i in await self._redis.smembers(self._active)]
        records = [await self.batch(i, None) for i in ids]
        return [r for r in records if r is not None and r["status"] in wanted]

    async def move_batch(self, batch_id: str, old: BatchStatus, new: BatchStatus, *,
                         now: float, **fields: Any) -> bool:
        next_batch_status(old, new)
        stamp = f"{new.value}_at"
        line_state = {BatchStatus.CANCELLING: CANCELLED, BatchStatus.EXPIRED: EXPIRED}.get(new, "")
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, "" if value is None else value]
        return bool(await self._move_batch(
            keys=[self._batch(batch_id), self._batch(batch_id, "lines"),
                  self._batch(batch_id, "open"), self._active, self._delayed,
                  f"{self._p}count:{line_state or 'none'}"],
            args=[old.value, new.value, stamp, now, line_state,
                  "1" if new is BatchStatus.EXPIRED else "0", self._p,
                  "1" if new.value in _TERMINAL else "0", batch_id, int(self.retention_s),
                  *pairs]))

    async def start_batch(self, batch_id: str, owner: str, lines: Sequence[BatchLine],
                          problems: Sequence[LineProblem], *, endpoint: str, now: float,
                          ) -> bool:
        rows: list[tuple[int, str, dict[str, Any], bool]] = []
        for line in lines:
            job_id = new_id("batch_req_")
            rows.append((line.line, job_id, {
                "id": job_id, "batch_id": batch_id, "line": line.line,
                "custom_id": line.custom_id, "owner": owner, "method": "POST", "path": endpoint,
                "body": line.body, "state": QUEUED, "tries": 0, "not_before": now,
                "created_at": now}, True))
        for p in problems:
            job_id = new_id("batch_req_")
            rows.append((p.line, job_id, {
                "id": job_id, "batch_id": batch_id, "line": p.line, "custom_id": p.custom_id,
                "owner": owner, "method": "POST", "path": endpoint, "state": DONE, "tries": 0,
                "not_before": now, "created_at": now, "finished_at": now,
                "error": json.dumps({"code": p.code, "message": p.message, "line": p.line})},
                False))
        rows.sort(key=lambda r: r[0])
        key = self._batch(batch_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            if (await pipe.hget(key, "status") or b"").decode() != BatchStatus.VALIDATING.value:
                return False
            pipe.multi()
            pipe.hset(key, mapping={"status": BatchStatus.IN_PROGRESS.value,
                                    "in_progress_at": now, "total": len(rows)})
            for _, job_id, fields, queued in rows:
                pipe.hset(self._job(job_id), mapping=_flat(fields))
                pipe.rpush(self._batch(batch_id, "lines"), job_id)
                if queued:
                    pipe.xadd(self._stream, {"job": job_id})
            pipe.set(self._batch(batch_id, "open"), len(lines))
            pipe.set(self._batch(batch_id, "failed"), len(problems))
            pipe.set(self._batch(batch_id, "completed"), 0)
            await pipe.execute()
        return True

    async def cancel_queued_lines(self, batch_id: str, *, now: float) -> None:
        # The move to cancelling marked every queued line; a try that ended since put
        # its line back in the queue: mark again (the script skips a status mismatch).
        await self._move_batch(
            keys=[self._batch(batch_id), self._batch(batch_id, "lines"),
                  self._batch(batch_id, "open"), self._active, self._delayed,
                  f"{self._p}count:cancelled"],
            args=[BatchStatus.CANCELLING.value, BatchStatus.CANCELLING.value, "checked_at", now,
                  CANCELLED, "0", self._p, "0", batch_id, 0])

    async def unfinished_lines(self, batch_id: str) -> int:
        return int(await self._redis.get(self._batch(batch_id, "open")) or 0)

    async def batch_results(self, batch_id: str) -> list[dict[str, Any]]:
        ids = await self._redis.lrange(self._batch(batch_id, "lines"), 0, -1)
        fields = ("id", "line", "custom_id", "state", "status", "response", "error")
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._job(job_id.decode()), fields)
            rows = await pipe.execute()
        return [{name: _value(name, raw or b"") for name, raw in zip(fields, row, strict=True)}
                for row in rows]

