"""The SQLite audit log: dense sequence numbers, idempotent keys, durability across a reopen, and
roots and proofs from the store equal to the in-memory reference."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lucerna.audit import merkle
from lucerna.audit.checkpoints import Checkpoint, CheckpointError, SignedCheckpoint, sign
from lucerna.audit.keys import SigningKey
from lucerna.audit.log import Appended, LogEntry, LogRangeError, SqliteAuditLog

pytestmark = pytest.mark.unit

ORIGIN = "test.local/audit-log"


@pytest.fixture
async def audit_log(tmp_path: Path) -> AsyncIterator[SqliteAuditLog]:
    log = SqliteAuditLog(tmp_path / "audit.db")
    await log.start()
    yield log
    await log.close()


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate(f"{ORIGIN}/key-1")


def _entries(start: int, count: int) -> list[LogEntry]:
    return [LogEntry(f"msg-{i}", f"record {i}".encode() * (i % 4)) for i in range(start, start + count)]


async def test_sequence_numbers_are_dense_and_in_order(audit_log: SqliteAuditLog) -> None:
    first = await audit_log.append(_entries(0, 3))
    second = await audit_log.append(_entries(3, 5))
    assert [a.seq for a in first + second] == list(range(8))
    assert all(a.new for a in first + second)
    assert await audit_log.size() == 8
    stored = await audit_log.entry(5)
    assert stored is not None
    assert (stored.seq, stored.key, stored.data) == (5, "msg-5", _entries(5, 1)[0].data)
    assert stored.leaf_hash == second[2].leaf_hash == merkle.leaf_hash(stored.data)
    assert await audit_log.entry(8) is None
    assert await audit_log.append([]) == []


async def test_a_known_key_is_not_appended_again(audit_log: SqliteAuditLog) -> None:
    await audit_log.append(_entries(0, 4))
    again = await audit_log.append(
        [LogEntry("msg-2", b"redelivered"), *_entries(4, 1), LogEntry("msg-4", b"x")]
    )
    assert [(a.seq, a.new) for a in again] == [(2, False), (4, True), (4, False)]
    assert again[0].leaf_hash == merkle.leaf_hash(
        _entries(2, 1)[0].data
    )  # the stored entry's, not the new bytes
    assert await audit_log.size() == 5
    by_key = await audit_log.entry_by_key("msg-2")
    assert by_key is not None
    assert by_key.seq == 2
    assert await audit_log.entry_by_key("msg-99") is None


async def test_concurrent_appends_stay_dense(audit_log: SqliteAuditLog) -> None:
    batches = [_entries(i * 10, 10) for i in range(20)]
    results = await asyncio.gather(*(audit_log.append(b) for b in batches))
    seqs = sorted(a.seq for result in results for a in result)
    assert seqs == list(range(200))
    assert await audit_log.root() == merkle.root(
        [merkle.leaf_hash(e.data) for e in _stored_order(results, batches)]
    )


def _stored_order(results: list[list[Appended]], batches: list[list[LogEntry]]) -> list[LogEntry]:
    by_seq = {
        appended.seq: entry
        for result, batch in zip(results, batches, strict=True)
        for appended, entry in zip(result, batch, strict=True)
    }
    return [by_seq[seq] for seq in sorted(by_seq)]


async def test_roots_and_proofs_equal_the_reference(audit_log: SqliteAuditLog) -> None:
    rng = random.Random(3)
    entries: list[LogEntry] = []
    while len(entries) < 150:
        batch = _entries(len(entries), rng.randrange(1, 12))
        await audit_log.append(batch)
        entries.extend(batch)
    leaves = [merkle.leaf_hash(e.data) for e in entries]
    nodes = _all_nodes(leaves)

    def node(level: int, index: int) -> bytes:
        return nodes[(level, index)]

    assert await audit_log.root() == merkle.root(leaves)
    for size in range(0, len(entries) + 1):
        root = await audit_log.root(size)
        assert root == merkle.root(leaves[:size]), size
        for seq in rng.sample(range(size), min(size, 6)):
            proof = await audit_log.inclusion_proof(seq, size)
            assert proof == merkle.inclusion_proof(seq, size, node)
            merkle.verify_inclusion(leaves[seq], seq, size, proof, root)
        for old in rng.sample(range(size + 1), min(size + 1, 6)):
            proof = await audit_log.consistency_proof(old, size)
            assert proof == merkle.consistency_proof(old, size, node)
            merkle.verify_consistency(old, size, merkle.root(leaves[:old]), root, proof)


def _all_nodes(leaves: list[bytes]) -> dict[tuple[int, int], bytes]:
    nodes, level, height = {}, leaves, 0
    while level:
        nodes.update({(height, i): h for i, h in enumerate(level)})
        level = [merkle.node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        height += 1
    return nodes


async def test_the_store_keeps_every_complete_subtree(audit_log: SqliteAuditLog, tmp_path: Path) -> None:
    await audit_log.append(_entries(0, 13))
    with sqlite3.connect(tmp_path / "audit.db") as c:
        stored = {(level, idx): h for level, idx, h in c.execute("SELECT level, idx, hash FROM nodes")}
    assert stored == _all_nodes([merkle.leaf_hash(e.data) for e in _entries(0, 13)])


async def test_out_of_range_requests_are_refused(audit_log: SqliteAuditLog) -> None:
    await audit_log.append(_entries(0, 5))
    with pytest.raises(LogRangeError, match="beyond the log"):
        await audit_log.root(6)
    with pytest.raises(LogRangeError, match="beyond the log"):
        await audit_log.inclusion_proof(0, 6)
    with pytest.raises(LogRangeError, match="not in the tree of size 3"):
        await audit_log.inclusion_proof(3, 3)
    with pytest.raises(LogRangeError, match="no consistency proof"):
        await audit_log.consistency_proof(4, 3)
    assert await audit_log.root(0) == merkle.EMPTY_ROOT


async def test_everything_acknowledged_is_there_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = SqliteAuditLog(path)
    await log.start()
    for i in range(10):
        await log.append(_entries(i * 7, 7))
    root = await log.root()
    # The crash-safety proxy: a second, independent connection (as after a restart) sees every
    # acknowledged batch, because each commit is synced (synchronous=FULL on the writer).
    assert await log._db.write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    reopened = SqliteAuditLog(path)
    await reopened.start()
    assert await reopened.size() == 70
    assert await reopened.root() == root
    await log.close()
    assert (await reopened.append(_entries(70, 1)))[0].seq == 70
    assert [(a.seq, a.new) for a in await reopened.append(_entries(0, 2))] == [(0, False), (1, False)]
    await reopened.close()


async def test_an_append_that_fails_leaves_nothing(audit_log: SqliteAuditLog) -> None:
    await audit_log.append(_entries(0, 3))
    with pytest.raises(sqlite3.Error):
        await audit_log.append([LogEntry("new-1", b"a"), LogEntry(None, b"b")])  # type: ignore[arg-type]
    assert await audit_log.size() == 3
    assert await audit_log.entry_by_key("new-1") is None
    assert (await audit_log.append([LogEntry("new-1", b"a")]))[0].seq == 3


async def test_checkpoints_are_kept_and_listed_newest_first(
    audit_log: SqliteAuditLog, key: SigningKey
) -> None:
    assert await audit_log.latest_checkpoint() is None
    signed: list[SignedCheckpoint] = []
    for size in (4, 9, 15):
        await audit_log.append(_entries(await audit_log.size(), size - await audit_log.size()))
        checkpoint = Checkpoint(ORIGIN, size, await audit_log.root(size))
        signed.append(sign(checkpoint, key))
        assert await audit_log.add_checkpoint(signed[-1])
    assert await audit_log.latest_checkpoint() == signed[-1]
    assert await audit_log.checkpoint(9) == signed[1]
    assert await audit_log.checkpoint(10) is None
    assert await audit_log.checkpoints() == signed[::-1]
    assert await audit_log.checkpoints(limit=1, before_size=15) == [signed[1]]
    assert await audit_log.checkpoints(before_size=4) == []
    # A second checkpoint of a kept size (another signer's, say) leaves the first in place.
    assert not await audit_log.add_checkpoint(sign(signed[0].checkpoint, key))
    assert await audit_log.checkpoint(4) == signed[0]


async def test_a_checkpoint_that_disagrees_with_the_log_is_refused(
    audit_log: SqliteAuditLog, key: SigningKey
) -> None:
    await audit_log.append(_entries(0, 6))
    wrong_root = Checkpoint(ORIGIN, 5, await audit_log.root(6))
    with pytest.raises(CheckpointError, match="not the log's root at size 5"):
        await audit_log.add_checkpoint(sign(wrong_root, key))
    too_big = Checkpoint(ORIGIN, 7, await audit_log.root(6))
    with pytest.raises(CheckpointError, match="beyond the log"):
        await audit_log.add_checkpoint(sign(too_big, key))
    assert await audit_log.checkpoints() == []


async def test_a_damaged_tree_is_reported(audit_log: SqliteAuditLog, tmp_path: Path) -> None:
    await audit_log.append(_entries(0, 8))
    with sqlite3.connect(tmp_path / "audit.db") as c:
        c.execute("DELETE FROM nodes WHERE level = 3")
    with pytest.raises(RuntimeError, match="damaged"):
        await audit_log.root()
