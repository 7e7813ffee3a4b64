"""Continuous anchoring against a fake of the anchor service that enforces the chaincode's rules:
each checkpoint must extend the last anchored one with a valid consistency proof; where each one
landed is recorded; a crash between commit and record loses nothing; a ledger that holds another
log's root halts anchoring."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lucerna.audit import merkle
from lucerna.audit.anchoring import (
    Anchor,
    Anchorer,
    AnchorError,
    AnchorRefusedError,
    SqliteAnchorStore,
)
from lucerna.audit.checkpoints import Checkpoint, CheckpointError, SignedCheckpoint, TrustedKey, sign, verify
from lucerna.audit.keys import Keyring
from lucerna.audit.log import LogEntry, SqliteAuditLog
from tests.contract import anchor_store

pytestmark = pytest.mark.unit

ORIGIN = "lucerna.test/audit-log"


class FakeLedger:
    """The chaincode's rules in memory: registered keys (a checkpoint must be signed by one), one
    anchor per size, consistency enforced."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.anchors: dict[int, Anchor] = {}
        self.unavailable = 0  # the next calls to fail as if the anchor service were down
        self.calls = 0

    async def register_key(self, origin: str, key_name: str, public_key: bytes) -> None:
        self._reachable()
        if self.keys.setdefault(key_name, public_key) != public_key:
            raise AnchorRefusedError(f"key {key_name} is registered with another public key")

    async def anchor(self, origin: str, note: str, consistency_proof: Sequence[bytes]) -> Anchor:
        self._reachable()
        try:
            checkpoint = verify(note, [TrustedKey.of(name, key) for name, key in self.keys.items()])
        except CheckpointError as error:
            raise AnchorRefusedError(f"not signed by a registered key: {error}") from error
        latest = max(self.anchors.values(), key=lambda a: a.size, default=None)
        if latest is not None:
            if checkpoint.size < latest.size:
                raise AnchorRefusedError("smaller than the last anchored size")
            try:
                merkle.verify_consistency(
                    latest.size, checkpoint.size, latest.root, checkpoint.root, list(consistency_proof)
                )
            except merkle.ProofError as error:
                raise AnchorRefusedError(f"inconsistent: {error}") from error
        anchor = Anchor(
            size=checkpoint.size,
            root=checkpoint.root,
            note=note,
            transaction_id=f"tx{len(self.anchors) + 1}",
            block_number=len(self.anchors) + 5,
            committed_at=datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
            channel="lucerna",
            chaincode="anchors",
        )
        self.anchors[checkpoint.size] = anchor
        return anchor

    async def latest(self, origin: str) -> Anchor | None:
        self._reachable()
        return max(self.anchors.values(), key=lambda a: a.size, default=None)

    async def by_size(self, origin: str, size: int) -> Anchor | None:
        self._reachable()
        return self.anchors.get(size)

    async def close(self) -> None:
        pass

    def _reachable(self) -> None:
        self.calls += 1
        if self.unavailable:
            self.unavailable -= 1
            raise AnchorError("anchor service unavailable")


class Rig:
    def __init__(self, audit_log: SqliteAuditLog, store: SqliteAnchorStore, keyring: Keyring) -> None:
        self.log = audit_log
        self.store = store
        self.keyring = keyring
        self.ledger = FakeLedger()
        self.appended = 0

    def anchorer(self) -> Anchorer:
        return Anchorer(self.log, self.store, self.ledger, self.keyring, ORIGIN, retry_delays=(0.01,))

    async def grow(self, n: int) -> SignedCheckpoint:
        """Append n entries and sign a checkpoint of the whole log."""
        entries = [LogEntry(f"k{self.appended + i}", f"entry {self.appended + i}".encode()) for i in range(n)]
        self.appended += n
        await self.log.append(entries)
        size = await self.log.size()
        signed = sign(Checkpoint(ORIGIN, size, await self.log.root(size)), self.keyring.active)
        await self.log.add_checkpoint(signed)
        return signed


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    audit_log = SqliteAuditLog(tmp_path / "audit.sqlite")
    store = SqliteAnchorStore(tmp_path / "anchors.sqlite")
    await audit_log.start()
    await store.start()
    made = Rig(audit_log, store, Keyring(tmp_path / "keys", ORIGIN))
    yield made
    await made.store.close()
    await audit_log.close()


async def test_each_new_checkpoint_is_anchored_with_a_proof_from_the_last_and_recorded(rig: Rig) -> None:
    anchorer = rig.anchorer()
    await anchorer.prepare()
    assert rig.ledger.keys == {rig.keyring.active.name: rig.keyring.active.public_key}

    await rig.grow(5)
    first = await anchorer.anchor_newest()
    await rig.grow(8)
    second = await anchorer.anchor_newest()

    assert first is not None and second is not None
    assert (first.size, second.size) == (5, 13)
    assert await anchorer.anchor_newest() is None  # nothing new to anchor
    assert await rig.store.at(13) == second
    assert await rig.store.latest() == second
    assert await rig.store.covering(3) == first
    assert await rig.store.covering(6) == second
    assert await rig.store.covering(14) is None


async def test_checkpoints_signed_while_anchoring_are_covered_by_the_next(rig: Rig) -> None:
    anchorer = rig.anchorer()
    await anchorer.prepare()
    await rig.grow(2)
    await rig.grow(3)
    await rig.grow(4)  # three checkpoints signed; only the newest needs the ledger

    anchored = await anchorer.anchor_newest()

    assert anchored is not None and anchored.size == 9
    assert sorted(rig.ledger.anchors) == [9]
    assert await rig.store.covering(2) == anchored


async def test_a_crash_between_commit_and_record_is_caught_up(rig: Rig, tmp_path: Path) -> None:
    await rig.grow(4)
    before_crash = rig.anchorer()
    await before_crash.prepare()
    committed = await before_crash.anchor_newest()
    assert committed is not None
    # The process died before its record was written: the restarted one finds an empty store.
    await rig.store.close()
    rig.store = SqliteAnchorStore(tmp_path / "anchors-after-crash.sqlite")
    await rig.store.start()

    restarted = rig.anchorer()
    await restarted.prepare()
    await rig.grow(3)
    extended = await restarted.anchor_newest()

    assert await rig.store.at(4) == committed
    assert extended is not None and extended.size == 7


async def test_a_ledger_holding_another_root_halts_anchoring(rig: Rig, tmp_path: Path) -> None:
    await rig.grow(4)
    anchorer = rig.anchorer()
    await anchorer.prepare()
    await anchorer.anchor_newest()
    # The log is rewritten: a new log under the same origin and keys, with other entries.
    rewritten = SqliteAuditLog(tmp_path / "rewritten.sqlite")
    await rewritten.start()
    await rewritten.append([LogEntry(f"other{i}", b"forged") for i in range(6)])
    impostor = Anchorer(rewritten, rig.store, rig.ledger, rig.keyring, ORIGIN, retry_delays=(0.01,))

    stopping = asyncio.Event()
    await asyncio.wait_for(impostor.run(stopping), 5)  # returns by itself: anchoring halted

    assert impostor.halted is not None and "not this log's" in impostor.halted
    assert sorted(rig.ledger.anchors) == [4]
    await rewritten.close()


async def test_the_loop_retries_an_unavailable_anchor_service_and_wakes_on_new_checkpoints(rig: Rig) -> None:
    anchorer = rig.anchorer()
    rig.ledger.unavailable = 2  # registration fails twice first
    stopping = asyncio.Event()
    await rig.grow(3)
    running = asyncio.create_task(anchorer.run(stopping))
    try:
        await _until(lambda: 3 in rig.ledger.anchors)
        await rig.grow(2)
        anchorer.wake.set()
        await _until(lambda: 5 in rig.ledger.anchors)
    finally:
        stopping.set()
        await asyncio.wait_for(running, 5)
    assert (await rig.store.latest()) == rig.ledger.anchors[5]


async def test_an_anchor_round_trips_through_its_json_form() -> None:
    anchor = Anchor(
        size=7,
        root=bytes(range(32)),
        note="lucerna.test/audit-log\n7\nAAAA\n\n— sig\n",
        transaction_id="abc",
        block_number=12,
        committed_at=datetime(2026, 11, 21, 12, 0, 1, tzinfo=UTC),
        channel="lucerna",
        chaincode="anchors",
    )
    assert Anchor.from_json(anchor.to_json()) == anchor


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polling state the anchorer changes
            await asyncio.sleep(0.01)


async def test_the_sqlite_anchor_store_keeps_the_contract(tmp_path: Path) -> None:
    store, other = SqliteAnchorStore(tmp_path / "a.sqlite"), SqliteAnchorStore(tmp_path / "a.sqlite")
    await store.start()
    await other.start()
    try:
        await anchor_store.check_anchors_by_size_latest_and_covering(store)
        await anchor_store.check_one_lease_at_a_time(store, other)
    finally:
        await other.close()
        await store.close()


async def test_only_the_lease_holder_anchors(rig: Rig) -> None:
    leader, follower = rig.anchorer(), rig.anchorer()
    await rig.grow(3)
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(leader.run(stopping))]
    try:
        await _until(lambda: 3 in rig.ledger.anchors)
        tasks.append(asyncio.create_task(follower.run(stopping)))
        await rig.grow(2)
        leader.wake.set()
        follower.wake.set()
        await _until(lambda: 5 in rig.ledger.anchors)
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
    assert not await rig.store.lead(follower.owner, 10)  # the leader still holds it
    assert sorted(rig.ledger.anchors) == [3, 5]
