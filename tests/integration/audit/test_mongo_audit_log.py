"""The MongoDB audit log against FerretDB v1: dense seqs under concurrent appenders (two adapters:
two processes), idempotent keys, proofs equal to the reference, a dead writer's batch completed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from pymongo import AsyncMongoClient

from lucerna.audit import merkle
from lucerna.audit.checkpoints import Checkpoint, CheckpointError, sign
from lucerna.audit.keys import SigningKey
from lucerna.audit.log import LogEntry, LogRangeError, MongoAuditLog

pytestmark = pytest.mark.integration

ORIGIN = "test.local/audit-log"


@pytest.fixture
async def audit_log(mongodb_url: str, mongodb_database: str) -> AsyncIterator[MongoAuditLog]:
    log = MongoAuditLog(mongodb_url, mongodb_database)
    await log.start()
    yield log
    await log.close()


@pytest.fixture
async def other_log(
    mongodb_url: str, mongodb_database: str, audit_log: MongoAuditLog
) -> AsyncIterator[MongoAuditLog]:
    log = MongoAuditLog(mongodb_url, mongodb_database)
    await log.start()
    yield log
    await log.close()


def _entries(start: int, count: int, prefix: str = "msg") -> list[LogEntry]:
    return [LogEntry(f"{prefix}-{i}", f"record {i}".encode()) for i in range(start, start + count)]


async def test_dense_idempotent_and_equal_to_the_reference(audit_log: MongoAuditLog) -> None:
    assert await audit_log.size() == 0
    assert await audit_log.root() == merkle.EMPTY_ROOT
    first = await audit_log.append(_entries(0, 5))
    again = await audit_log.append([*_entries(3, 4), LogEntry("msg-5", b"x")])
    assert [a.seq for a in first] == [0, 1, 2, 3, 4]
    assert [(a.seq, a.new) for a in again] == [(3, False), (4, False), (5, True), (6, True), (5, False)]
    assert await audit_log.size() == 7
    stored = await audit_log.entry(5)
    assert stored is not None
    assert (stored.key, stored.data) == ("msg-5", b"record 5")
    by_key = await audit_log.entry_by_key("msg-6")
    assert by_key is not None
    assert by_key.seq == 6
    assert await audit_log.entry(7) is None
    leaves = [merkle.leaf_hash(e.data) for e in _entries(0, 7)]
    assert await audit_log.root() == merkle.root(leaves)
    for size in range(1, 8):
        root = await audit_log.root(size)
        assert root == merkle.root(leaves[:size])
        for seq in range(size):
            merkle.verify_inclusion(leaves[seq], seq, size, await audit_log.inclusion_proof(seq, size), root)
        for old in range(size + 1):
            proof = await audit_log.consistency_proof(old, size)
            merkle.verify_consistency(old, size, merkle.root(leaves[:old]), root, proof)
    with pytest.raises(LogRangeError, match="beyond the log"):
        await audit_log.inclusion_proof(0, 8)


async def test_concurrent_appenders_in_two_processes_stay_dense(
    audit_log: MongoAuditLog, other_log: MongoAuditLog
) -> None:
    batches = [_entries(i * 5, 5) for i in range(12)]
    # The same keys sent through both adapters at once: each is appended once.
    results = await asyncio.gather(
        *(log.append(batch) for batch in batches for log in (audit_log, other_log))
    )
    appended = {a.seq for result in results for a in result if a.new}
    assert appended == set(range(60))
    assert await audit_log.size() == 60
    stored = [await audit_log.entry(seq) for seq in range(60)]
    assert sorted(e.key for e in stored if e is not None) == sorted(e.key for b in batches for e in b)
    leaves = [merkle.leaf_hash(e.data) for e in stored if e is not None]
    assert await other_log.root() == merkle.root(leaves)


async def test_a_dead_writers_batch_is_completed_by_the_next(
    audit_log: MongoAuditLog, mongodb_url: str, mongodb_database: str
) -> None:
    await audit_log.append(_entries(0, 3))
    # A writer that died after inserting two entries: no nodes, no keys, not published, lease left.
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url, tz_aware=True)
    database = client[mongodb_database]
    now = datetime.now(UTC)
    await database["audit_entries"].insert_many(
        [
            {"_id": 3 + i, "key": e.key, "data": e.data, "appended_at": now}
            for i, e in enumerate(_entries(3, 2))
        ]
    )
    await database["audit_state"].insert_one(
        {"_id": "writer", "owner": "dead", "expires": now - timedelta(seconds=1)}
    )
    await client.close()
    assert await audit_log.size() == 3  # not published: readers do not see them
    result = await audit_log.append([*_entries(3, 2), *_entries(5, 1)])
    assert [(a.seq, a.new) for a in result] == [(3, False), (4, False), (5, True)]
    assert await audit_log.root() == merkle.root([merkle.leaf_hash(e.data) for e in _entries(0, 6)])


async def test_checkpoints(audit_log: MongoAuditLog) -> None:
    key = SigningKey.generate(f"{ORIGIN}/key-1")
    signed = []
    for size in (2, 5):
        await audit_log.append(_entries(await audit_log.size(), size - await audit_log.size()))
        signed.append(sign(Checkpoint(ORIGIN, size, await audit_log.root(size)), key))
        assert await audit_log.add_checkpoint(signed[-1])
    assert not await audit_log.add_checkpoint(sign(signed[0].checkpoint, key))
    assert await audit_log.latest_checkpoint() == signed[1]
    assert await audit_log.checkpoint(2) == signed[0]
    assert await audit_log.checkpoints() == signed[::-1]
    assert await audit_log.checkpoints(before_size=5) == [signed[0]]
    with pytest.raises(CheckpointError, match="not the log's root"):
        await audit_log.add_checkpoint(sign(Checkpoint(ORIGIN, 4, await audit_log.root(5)), key))
