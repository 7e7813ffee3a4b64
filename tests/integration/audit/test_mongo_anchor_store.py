"""The anchor store on FerretDB keeps the same contract as on SQLite (``tests.contract.anchor_store``)."""

from __future__ import annotations

import pytest

from lucerna.audit.anchoring import MongoAnchorStore
from tests.contract import anchor_store

pytestmark = pytest.mark.integration


async def test_the_mongo_anchor_store_keeps_the_contract(mongodb_url: str, mongodb_database: str) -> None:
    store = MongoAnchorStore(mongodb_url, mongodb_database)
    other = MongoAnchorStore(mongodb_url, mongodb_database)
    await store.start()
    await other.start()
    try:
        await anchor_store.check_anchors_by_size_latest_and_covering(store)
        await anchor_store.check_one_lease_at_a_time(store, other)
    finally:
        await other.close()
        await store.close()
