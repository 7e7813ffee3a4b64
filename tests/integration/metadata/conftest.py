"""The metadata service over the server adapters: FerretDB (MongoDB wire) and Elasticsearch."""

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch
from pymongo import AsyncMongoClient

# The service helpers are shared with the unit tests (tests/unit/metadata/dicomweb_testkit.py).
for _folder in (
    Path(__file__).resolve().parents[3],
    Path(__file__).resolve().parents[2] / "unit" / "metadata",
):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from dicomweb_testkit import Env, running, seed  # noqa: E402

from lucerna.core.auth import Authenticator  # noqa: E402
from lucerna.core.events.inprocess import InProcessBus  # noqa: E402
from lucerna.core.service import Resources  # noqa: E402
from lucerna.core.settings import CoreSettings  # noqa: E402
from lucerna.core.storage.blobs import FilesystemBlobStore  # noqa: E402
from lucerna.core.storage.elastic import ElasticSearchIndex  # noqa: E402
from lucerna.core.storage.mongo import MongoMetadataStore  # noqa: E402


def server_resources(
    folder: Path, mongodb_url: str, database: str, elasticsearch_url: str, index: str
) -> Resources:
    """Resources on the session's FerretDB and Elasticsearch (not started)."""
    settings = CoreSettings(data_dir=folder, auth_required=False)
    return Resources(
        settings=settings,
        auth=Authenticator(settings),
        bus=InProcessBus(),
        blobs=FilesystemBlobStore(folder / "blobs"),
        metadata=MongoMetadataStore(mongodb_url, database),
        search=ElasticSearchIndex(elasticsearch_url, index),
    )


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
    await elastic.indices.delete(index=index, ignore_unavailable=True)
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
