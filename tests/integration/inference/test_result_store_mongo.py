"""The result store contract on the MongoDB adapter, against FerretDB v1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lucerna.inference.results import MongoResultStore
from tests.contract.result_store import *  # noqa: F403


@pytest.fixture
async def result_store(mongodb_url: str, mongodb_database: str) -> AsyncIterator[MongoResultStore]:
    store = MongoResultStore(mongodb_url, mongodb_database)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def other_result_store(
    mongodb_url: str, mongodb_database: str, result_store: MongoResultStore
) -> AsyncIterator[MongoResultStore]:
    store = MongoResultStore(mongodb_url, mongodb_database)
    await store.start()
    yield store
    await store.close()
