"""The storage contract against the server adapters: FerretDB (MongoDB wire) and Elasticsearch."""

import uuid
from collections.abc import AsyncIterator

import pytest
from elasticsearch import AsyncElasticsearch
from pymongo import AsyncMongoClient

from lucerna.core.storage.elastic import ElasticSearchIndex
from lucerna.core.storage.mongo import MongoMetadataStore
from tests.contract.metadata_store import *  # noqa: F403 - the shared contract tests

pytestmark = pytest.mark.integration


@pytest.fixture
async def database(mongodb_url: str) -> AsyncIterator[str]:
    """A fresh database name, dropped after the test."""
    name = f"lucerna_test_{uuid.uuid4().hex[:12]}"
    yield name
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    await client.drop_database(name)
    await client.close()


@pytest.fixture
async def store(mongodb_url: str, database: str) -> AsyncIterator[MongoMetadataStore]:
    adapter = MongoMetadataStore(mongodb_url, database)
    await adapter.start()
    yield adapter
    await adapter.close()


@pytest.fixture
async def other_store(
    mongodb_url: str, database: str, store: MongoMetadataStore
) -> AsyncIterator[MongoMetadataStore]:
    adapter = MongoMetadataStore(mongodb_url, database)
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
    await client.indices.delete(index=index, ignore_unavailable=True)
    await client.close()
