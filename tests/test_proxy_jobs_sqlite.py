"""proxy._jobs_sqlite: the accept path's group commit on the event loop's own connection."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest
from skyroute.proxy._jobs_sqlite import LAZY_SYNC_S
from skyroute.proxy._jobs_store import JobStore

from .conftest import eventually


async def submit(store: JobStore, i: int) -> str:
    record, created = await store.submit(owner="k", method="POST", path="/v1/chat/completions",
                                         body=b'{"n": %d}' % i, idem_key=None, webhook=None,
                                         now=time.time())
    assert created
    return str(record["id"])


async def test_submits_arriving_together_share_one_commit_and_are_all_stored(tmp_path: Path):
    store = JobStore(tmp_path)
    await store.start()
    try:
        ids = await asyncio.gather(*(submit(store, i) for i in range(200)))
        commits, rows = store.group_commits()
        assert rows == 200
        assert commits < 20  # one per fsync time, not one per submit
        assert (await store.counts())["queued"] == 200
        for job_id in ids[:5]:
            assert (await store.job(job_id, "k"))["state"] == "queued"  # type: ignore[index]
    finally:
        await store.aclose()
    # What a 202 promised is in the file, read by a connection of its own.
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 200


async def test_a_submit_while_another_writer_holds_the_lock_waits_its_turn(tmp_path: Path):
    """The event loop never waits for the write lock: the rows go to the store thread, which
    does (busy_timeout), and the submit completes once the other writer commits."""
    store = JobStore(tmp_path)
    await store.start()
    other = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(submit(store, 1))
        started = time.monotonic()
        while time.monotonic() - started < 0.3:  # the loop keeps running meanwhile
            await asyncio.sleep(0.01)
        assert not pending.done()
        other.execute("COMMIT")
        async with asyncio.timeout(10):
            job_id = await pending
        assert (await store.job(job_id, "k")) is not None
        assert store.group_commits() == (0, 0)  # it went through the store thread
    finally:
        other.close()
        await store.aclose()


async def test_reads_answer_while_another_writer_holds_the_lock(tmp_path: Path):
    """Reads run on the reader thread's snapshot: a status poll or a count waits neither for
    the write lock another connection holds nor for the writes queued behind it."""
    store = JobStore(tmp_path)
    await store.start()
    other = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    try:
        job_id = await submit(store, 1)
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE jobs SET tries=7")  # not committed: no reader sees it
        queued = asyncio.ensure_future(store.claim(worker="w", limit=1, lease_s=30,
                                                   now=time.time()))
        async with asyncio.timeout(5):  # well under busy_timeout (10 s)
            assert (await store.counts())["queued"] == 1
            job = await store.job(job_id, "k")
        assert job is not None and job["tries"] == 0
        assert not queued.done()  # the claim (a write) waits for the lock
        other.execute("COMMIT")
        async with asyncio.timeout(10):
            claimed = await queued
        assert [j.id for j in claimed] == [job_id]
        assert (await store.counts())["running"] == 1
    finally:
        other.close()
        await store.aclose()


async def test_the_lanes_own_records_are_fsynced_later_and_what_a_client_is_told_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """In a jobs worker's store (``defer_lane_syncs``) a claim resolves without waiting for
    the disk; its commit is fsync'd by the store thread within ``LAZY_SYNC_S``, by the next
    durable write, or at close. A submit resolves only after an fsync."""
    fsyncs = counted_fsyncs(monkeypatch)
    store = JobStore(tmp_path, defer_lane_syncs=True)  # as a jobs worker's
    await store.start()
    fsyncs.clear()  # the directory's, at start
    closed = False
    try:
        await submit(store, 1)
        assert len(fsyncs) == 1  # the 202's promise
        claimed = await store.claim(worker="w", limit=1, lease_s=30.0, now=time.time())
        assert len(claimed) == 1 and len(fsyncs) == 1  # committed, not waited for
        await eventually(lambda: len(fsyncs) == 2, timeout=LAZY_SYNC_S * 10)  # the timer
        await store.renew(worker="w", lease_s=30.0, now=time.time())
        assert len(fsyncs) == 2
        await store.aclose()
        closed = True
        assert len(fsyncs) == 3  # the renewal's, before the store closed
    finally:
        if not closed:
            await store.aclose()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT state FROM jobs").fetchone()[0] == "running"


async def test_a_lane_inline_waits_for_the_disk_as_before(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """Without ``defer_lane_syncs`` (a lane inline) a claim resolves once fsync'd."""
    fsyncs = counted_fsyncs(monkeypatch)
    store = JobStore(tmp_path)
    await store.start()
    try:
        await submit(store, 1)
        fsyncs.clear()
        assert len(await store.claim(worker="w", limit=1, lease_s=30.0, now=time.time())) == 1
        assert len(fsyncs) == 1
    finally:
        await store.aclose()


def counted_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``os.fsync`` still syncs, and each call's descriptor is appended to the list."""
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counted(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return fsyncs
