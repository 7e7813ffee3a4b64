"""The metadata service over the server adapters: FerretDB (MongoDB wire) and Elasticsearch."""

import uuid
from collections.abc import AsyncIterator

import pytest
from elasticsearch import AsyncElasticsearch
from pymongo import AsyncMongoClient

from tests.integration.elastic_indexes import drop
from tests.integration.metadata.server_kit import server_resources
from tests.unit.metadata.dicomweb_testkit import Env, running, seed


@pytest.fixture(scope="module")
async def names(mongodb_url: str, elasticsearch_url: str) -> AsyncIterator[tuple[str, str]]:
    """A fresh database and index name, dropped after the module."""
    suffix = uuid.uuid4().hex[:12]
    database, index = f"lucerna_test_{suffix}", f"lucerna-test-{suffix}"
    yield database, index
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    await client.drop_database(database)
    await client.close()
    elastic = AsyncElasticsearch(elasticsearch_url)
    await drop(elastic, index)
    await elastic.close()


@pytest.fixture(scope="module")
async def server_env(
    tmp_path_factory: pytest.TempPathFactory, mongodb_url: str, elasticsearch_url: str, names: tuple[str, str]
) -> AsyncIterator[Env]:
    """A seeded metadata service on the real servers."""
    folder = tmp_path_factory.mktemp("metadata-servers")
    async for env in running(server_resources(folder, mongodb_url, names[0], elasticsearch_url, names[1])):
        await seed(env)
        yield env
