"""The job store contract on the embedded SQLite adapter (two adapters on one file: two processes)."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lucerna.orchestrator.sqlite_store import SqliteJobStore
from tests.contract.job_store import *  # noqa: F403 - the shared contract tests


@pytest.fixture
async def job_store(tmp_path: Path) -> AsyncIterator[SqliteJobStore]:
    store = SqliteJobStore(tmp_path / "orchestrator.sqlite")
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def other_job_store(tmp_path: Path, job_store: SqliteJobStore) -> AsyncIterator[SqliteJobStore]:
    store = SqliteJobStore(tmp_path / "orchestrator.sqlite")
    await store.start()
    yield store
    await store.close()
