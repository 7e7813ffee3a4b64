"""The storage contract against the server adapters: FerretDB (MongoDB wire) and Elasticsearch."""

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from elasticsearch import AsyncElasticsearch
from pymongo import AsyncMongoClient

from lucerna.core.storage.elastic import ElasticSearchIndex
from lucerna.core.storage.mongo import MongoMetadataStore
from lucerna.core.storage.ports import Match, PutOutcome, Query
from tests.contract.metadata_store import *  # noqa: F403 - the shared contract tests
from tests.contract.metadata_store import index_all, make, three_studies
from tests.integration.elastic_indexes import drop

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(mongodb_url: str, mongodb_database: str) -> AsyncIterator[MongoMetadataStore]:
    adapter = MongoMetadataStore(mongodb_url, mongodb_database)
    await adapter.start()
    yield adapter
    await adapter.close()


@pytest.fixture
async def other_store(
    mongodb_url: str, mongodb_database: str, store: MongoMetadataStore
) -> AsyncIterator[MongoMetadataStore]:
    adapter = MongoMetadataStore(mongodb_url, mongodb_database)
    await adapter.start()
    yield adapter
    await adapter.close()


@pytest.fixture
async def search(elasticsearch_url: str) -> AsyncIterator[ElasticSearchIndex]:
    index = f"lucerna-test-{uuid.uuid4().hex[:12]}"
    adapter = ElasticSearchIndex(elasticsearch_url, index)
    await adapter.start()
    yield adapter
    await adapter.close()
    client = AsyncElasticsearch(elasticsearch_url)
    await drop(client, index)
    await client.close()


async def test_audit_pointers_left_by_other_writes_are_told_apart(
    mongodb_url: str, mongodb_database: str, store: MongoMetadataStore
) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url, tz_aware=True)
    pointers = client[mongodb_database]["audit_outbox"]
    now = datetime.now(UTC)
    await pointers.insert_many([
        {"_id": "9.9.1", "created_at": now - timedelta(hours=1)},  # its write died long ago
        {"_id": "9.9.2", "created_at": now - timedelta(seconds=30)},  # its write may still be running
        {"_id": "1.2.1.1.1", "created_at": now - timedelta(hours=1)},  # left before its instance came
    ])
    later = now + timedelta(minutes=1)
    assert await store.put_instances([make(sop="1.2.1.1.1")]) == [PutOutcome.CREATED]
    assert [record.sop_instance_uid for record in await store.pending_audit(later)] == ["1.2.1.1.1"]
    assert sorted([document["_id"] async for document in pointers.find({})]) == ["1.2.1.1.1", "9.9.2"]
    await client.close()


async def test_elasticsearch_answers_study_attribute_queries(
    store: MongoMetadataStore, search: ElasticSearchIndex
) -> None:
    await three_studies(store)
    await index_all(store, search)
    query = Query("study", [Match("PatientName", "wildcard", "D*")])
    assert await search.query_studies(query) == await store.query(query) != []
    assert await search.query_studies(Query("study", [Match("Modality", "exact", "CT")])) is None
    assert await search.query_studies(Query("study", limit=100, offset=9_950)) is None  # past the window


async def test_an_index_of_an_older_schema_leaves_queries_to_the_store(
    elasticsearch_url: str, store: MongoMetadataStore
) -> None:
    index = f"lucerna-test-{uuid.uuid4().hex[:12]}"
    client = AsyncElasticsearch(elasticsearch_url)
    older = {"dynamic": "strict", "properties": {"study_uid": {"type": "keyword"}}}
    await client.indices.create(index=index, mappings=older)
    adapter = ElasticSearchIndex(elasticsearch_url, index)
    await adapter.start()
    try:
        await three_studies(store)
        await index_all(store, adapter)  # the mapping was extended: indexing goes on
        assert await adapter.query_studies(Query("study")) is None
        assert await adapter.fuzzy_patient_names("DOE^JOHN") == ["1.2.1"]
        await adapter.reset()  # as `lucerna reindex` does
        await index_all(store, adapter)
        assert await adapter.query_studies(Query("study")) == await store.query(Query("study"))
    finally:
        await adapter.close()
        await drop(client, index)
        await client.close()
