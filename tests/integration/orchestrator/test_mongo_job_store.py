"""The job store contract on the MongoDB adapter against FerretDB (two adapters: two processes)."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from pymongo import AsyncMongoClient

from lucerna.orchestrator.mongo_store import MongoJobStore
from tests.contract.job_store import *  # noqa: F403 - the shared contract tests
from tests.contract.job_store import job

pytestmark = pytest.mark.integration



@pytest.fixture
async def job_store(mongodb_url: str, mongodb_database: str) -> AsyncIterator[MongoJobStore]:
    store = MongoJobStore(mongodb_url, mongodb_database)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def other_job_store(
    mongodb_url: str, mongodb_database: str, job_store: MongoJobStore
) -> AsyncIterator[MongoJobStore]:
    store = MongoJobStore(mongodb_url, mongodb_database)
    await store.start()
    yield store
    await store.close()


async def test_a_claim_left_by_a_dead_writer_expires(
    mongodb_url: str, mongodb_database: str, job_store: MongoJobStore
) -> None:
    made, _ = await job_store.create_job(job())
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url, tz_aware=True)
    claims = client[mongodb_database]["orchestrator_job_claims"]
    await claims.insert_one({"_id": f"{made.job_id}:1", "expires": datetime.now(UTC) + timedelta(seconds=30)})
    change = made.cancelled(datetime.now(UTC), "ops")
    assert await job_store.update_job(change) is None  # a live claim: another writer is changing it
    expired = datetime.now(UTC) - timedelta(seconds=1)
    await claims.update_one({"_id": f"{made.job_id}:1"}, {"$set": {"expires": expired}})
    assert await job_store.update_job(change) is None  # the expired claim is removed by this writer
    stored = await job_store.update_job(change)
    assert stored is not None and stored.version == 1
    assert await claims.count_documents({}) == 0
    await client.close()
