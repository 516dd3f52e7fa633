"""The job stores' refill: ending a job claims the jobs that take its slot, in one step.

Both stores (SQLite, and the shared Redis under a prefix of its own), driven through
the interface the runner uses. A refilled job is claimed exactly as ``claim`` claims
one: running by that worker, never handed to two callers, never the job just retried.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from skyroute.proxy._jobs_redis import RedisJobStore
from skyroute.proxy._jobs_store import Job, JobStore, Refill

from .test_proxy_jobs import SHARED_REDIS, delete_prefix

LEASE_S = 30.0


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path,
                ) -> AsyncIterator[JobStore | RedisJobStore]:
    prefix = f"skyroute-test:{os.urandom(6).hex()}:"
    opened: JobStore | RedisJobStore = (
        JobStore(tmp_path) if request.param == "sqlite"
        else RedisJobStore(SHARED_REDIS, prefix, tmp_path, retention_s=60))
    await opened.start()
    try:
        async with asyncio.timeout(30):
            yield opened
    finally:
        await opened.aclose()
        if request.param == "redis":
            delete_prefix(SHARED_REDIS, prefix)


async def submit(store: JobStore | RedisJobStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        record, _ = await store.submit(owner="k", method="POST", path="/v1/chat/completions",
                                       body=b'{"n": %d}' % i, idem_key=None, webhook=None,
                                       now=time.time())
        ids.append(str(record["id"]))
    return ids


async def state(store: JobStore | RedisJobStore, job: Job) -> str:
    record = await store.job(job.id, "k")
    assert record is not None
    return str(record["state"])


async def test_finishing_a_job_claims_its_refill_in_the_same_step(store):
    ids = await submit(store, 4)
    [first] = await store.claim(worker="w", limit=1, lease_s=LEASE_S, now=time.time())
    ended, claimed = await store.finish(first, worker="w", status=200, response=b"{}",
                                        error=None, now=time.time(),
                                        refill=Refill(2, LEASE_S))
    assert ended
    assert await state(store, first) == "done"
    assert len(claimed) == 2 and first.id not in {j.id for j in claimed}
    assert {j.id for j in claimed} <= set(ids)
    for job in claimed:
        assert await state(store, job) == "running"
        assert job.body is not None and job.tries == 0
    assert await store.counts() == {"queued": 1, "running": 2}
    # Those jobs are this worker's as if claimed alone: it can end them.
    ended, more = await store.finish(claimed[0], worker="w", status=200, response=b"{}",
                                     error=None, now=time.time())
    assert ended and more == []


async def test_a_retried_job_is_not_its_own_refill(store):
    await submit(store, 2)
    [first] = await store.claim(worker="w", limit=1, lease_s=LEASE_S, now=time.time())
    now = time.time()
    ok, claimed = await store.retry_later(first, worker="w", at=now + 60, error="busy",
                                          now=now, refill=Refill(5, LEASE_S))
    assert ok
    assert len(claimed) == 1 and claimed[0].id != first.id  # the other one; first waits
    assert await state(store, first) == "queued"


async def test_a_worker_that_lost_its_job_still_gets_a_refill_but_writes_nothing(store):
    await submit(store, 2)
    [first] = await store.claim(worker="w", limit=1, lease_s=LEASE_S, now=time.time())
    ended, claimed = await store.finish(first, worker="someone-else", status=200,
                                        response=b"{}", error=None, now=time.time(),
                                        refill=Refill(1, LEASE_S))
    assert not ended
    assert await state(store, first) == "running"  # still w's
    assert len(claimed) == 1 and claimed[0].id != first.id


async def test_refills_of_jobs_ending_together_are_shared_out_never_twice(store):
    ids = await submit(store, 10)
    running = await store.claim(worker="w", limit=6, lease_s=LEASE_S, now=time.time())
    assert len(running) == 6
    results = await asyncio.gather(*(
        store.finish(job, worker="w", status=200, response=b"{}", error=None,
                     now=time.time(), refill=Refill(1, LEASE_S)) for job in running))
    assert all(ended for ended, _ in results)
    refilled = [job.id for _, claimed in results for job in claimed]
    assert all(len(claimed) <= 1 for _, claimed in results)
    assert len(refilled) == 4 == len(set(refilled))  # only 4 were left
    assert set(refilled) == set(ids) - {job.id for job in running}
    assert await store.counts() == {"queued": 0, "running": 4}
