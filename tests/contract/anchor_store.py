"""The ``AnchorStore`` contract, run against each adapter: one anchor per size, lookups by size,
latest and covering, and one anchoring lease at a time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from lucerna.audit.anchoring import Anchor, AnchorStore


def anchor(size: int, transaction: str = "") -> Anchor:
    return Anchor(
        size=size,
        root=size.to_bytes(32, "big"),
        note=f"lucerna.test/audit-log\n{size}\nroot\n\n— sig\n",
        transaction_id=transaction or f"tx-{size}",
        block_number=size + 3,
        committed_at=datetime(2026, 11, 21, 12, 0, size % 60, tzinfo=UTC),
        channel="lucerna",
        chaincode="anchors",
    )


async def check_anchors_by_size_latest_and_covering(store: AnchorStore) -> None:
    assert await store.latest() is None
    assert await store.covering(1) is None
    for size in (5, 13, 40):
        await store.add(anchor(size))
    await store.add(anchor(13, "a-second-record-of-size-13"))  # the first one stays

    assert await store.at(13) == anchor(13)
    assert await store.at(14) is None
    assert await store.latest() == anchor(40)
    assert await store.covering(1) == anchor(5)
    assert await store.covering(5) == anchor(5)
    assert await store.covering(6) == anchor(13)
    assert await store.covering(41) is None


async def check_one_lease_at_a_time(store: AnchorStore, other: AnchorStore) -> None:
    assert await store.lead("first", 0.5)
    assert not await other.lead("second", 0.5)
    assert await store.lead("first", 0.5)  # renewed by its holder
    await asyncio.sleep(0.7)  # lapsed
    # The lapsed lease is cleared by one attempt and taken by the next (or by the same one).
    assert await other.lead("second", 5) or await other.lead("second", 5)
    assert not await store.lead("first", 5)
