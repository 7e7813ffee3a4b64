"""The storage contract against the embedded SQLite adapters."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from tests.contract.metadata_store import *  # noqa: F403 - the shared contract tests

pytestmark = pytest.mark.unit


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteMetadataStore]:
    adapter = SqliteMetadataStore(tmp_path / "metadata.sqlite")
    await adapter.start()
    yield adapter
    await adapter.close()


@pytest.fixture
async def other_store(tmp_path: Path, store: SqliteMetadataStore) -> AsyncIterator[SqliteMetadataStore]:
    adapter = SqliteMetadataStore(tmp_path / "metadata.sqlite")
    await adapter.start()
    yield adapter
    await adapter.close()


@pytest.fixture
async def search(tmp_path: Path) -> AsyncIterator[SqliteSearchIndex]:
    adapter = SqliteSearchIndex(tmp_path / "search.sqlite")
    await adapter.start()
    yield adapter
    await adapter.close()
