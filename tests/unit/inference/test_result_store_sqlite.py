"""The result store contract on the SQLite adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lucerna.inference.results import SqliteResultStore
from tests.contract.result_store import *  # noqa: F403


@pytest.fixture
async def result_store(tmp_path: Path) -> AsyncIterator[SqliteResultStore]:
    store = SqliteResultStore(tmp_path / "inference.sqlite")
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def other_result_store(
    tmp_path: Path, result_store: SqliteResultStore
) -> AsyncIterator[SqliteResultStore]:
    store = SqliteResultStore(tmp_path / "inference.sqlite")
    await store.start()
    yield store
    await store.close()
