"""The storage contract against the embedded SQLite adapters."""

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from tests.contract.metadata_store import *  # noqa: F403 - the shared contract tests
from tests.contract.metadata_store import T0, claim, make

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


async def test_a_file_from_before_the_assembly_outbox_keeps_its_open_bursts(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    store = SqliteMetadataStore(path)
    await store.start()
    await store.put_instances([make(sop="1.2.1.1.1"), make(sop="1.2.1.1.2", sha="b")])
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as old, old:  # back to the former layout
        old.execute("DELETE FROM assembly_outbox")
        for column, default in [
            ("burst_instances", "2"), ("claimed", "0"), ("boundary", "1"), ("boundary_at", "NULL"),
            ("last_arrival", str(T0.timestamp())), ("sources", "'[\"stow:test\"]'"),
        ]:
            old.execute(f"ALTER TABLE studies ADD COLUMN {column} DEFAULT {default}")
        old.execute("UPDATE studies SET burst = 1")
        old.execute("CREATE INDEX studies_waiting ON studies (last_arrival) WHERE claimed = 0")
    store = SqliteMetadataStore(path)
    await store.start()
    try:
        [ready] = await claim(store, T0 + timedelta(minutes=1))
        assert (ready.study_uid, ready.burst, ready.burst_instances) == ("1.2.1", 1, 2)
        assert ready.sources == ("stow:test",)
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as migrated:
        columns = {row[1] for row in migrated.execute("PRAGMA table_info(studies)")}
    assert not columns & {"burst_instances", "claimed", "boundary", "boundary_at", "last_arrival", "sources"}
