"""The embedded search indexes rebuild in one transaction: readers see the old index until it
commits, writes made during the rebuild stay, and a second rebuild is refused while one runs."""

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lucerna.core.storage.ports import DicomJson, ReindexRunningError
from lucerna.core.storage.sqlite import SqliteSearchIndex
from lucerna.fhir.sqlite_store import SqliteResources
from lucerna.fhir.store import IndexEntries, ResourceWrite, SearchQuery, StoredResource


def study(uid: str, name: str) -> DicomJson:
    return {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00081030": {"vr": "LO", "Value": ["CHEST CT"]},
        "00201208": {"vr": "IS", "Value": [1]},
    }


def tombstone(uid: str) -> DicomJson:
    return {"0020000D": {"vr": "UI", "Value": [uid]}, "00201208": {"vr": "IS", "Value": [0]}}


async def test_study_index_rebuild_keeps_reads_and_concurrent_writes(tmp_path: Path) -> None:
    index = SqliteSearchIndex(tmp_path / "search.sqlite")
    await index.start()
    try:
        await index.index_studies(
            [study("1.1", "Doe^John"), study("1.2", "Gone^Soon"), study("9.9", "Stray^Entry")]
        )
        reading, resume = asyncio.Event(), asyncio.Event()

        async def store() -> AsyncIterator[DicomJson]:
            yield study("1.1", "Doe^John")
            yield study("1.2", "Gone^Soon")  # read before its removal below
            reading.set()
            await resume.wait()
            yield study("1.3", "New^Patient")

        rebuild = asyncio.create_task(index.rebuild(store()))
        await reading.wait()
        with pytest.raises(ReindexRunningError, match="already running"):
            await index.rebuild(store())
        # The indexer, meanwhile: a removal, a rename and a new study; searches still see the old index.
        await index.index_studies(
            [tombstone("1.2"), study("1.1", "Renamed^Patient"), study("1.4", "Late^Arrival")]
        )
        assert await index.fuzzy_patient_names("STRAY") == ["9.9"]
        resume.set()
        assert await rebuild == 3

        assert await index.fuzzy_patient_names("STRAY") == []  # not in the store: gone
        assert await index.fuzzy_patient_names("GONE") == []  # the removal won over the older read
        assert await index.fuzzy_patient_names("RENAMED") == ["1.1"]  # the rename too
        assert await index.fuzzy_patient_names("DOE") == []
        assert await index.fuzzy_patient_names("LATE") == ["1.4"]
        assert await index.fuzzy_patient_names("NEW") == ["1.3"]
        assert await index.rebuild(store_of([study("1.1", "Doe^John")])) == 1  # the lock was released
        assert await index.search("chest") == ["1.1"]
    finally:
        await index.close()


async def store_of(studies: Sequence[DicomJson]) -> AsyncIterator[DicomJson]:
    for item in studies:
        yield item


async def test_study_index_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    index = SqliteSearchIndex(tmp_path / "search.sqlite")
    await index.start()
    try:
        dead = 2**22 + 12345  # above the default pid_max: no such process
        await index._db.write(
            lambda c: c.execute(
                "INSERT INTO rebuilds (id, started, host, pid) VALUES (1, 0, ?, ?)",
                (socket.gethostname(), dead),
            )
        )
        assert await index.rebuild(store_of([study("1.1", "Doe^John")])) == 1
        assert await index.fuzzy_patient_names("DOE") == ["1.1"]
    finally:
        await index.close()


def observation(id: str, code: str) -> ResourceWrite:
    body = {"resourceType": "Observation", "id": id, "status": "final", "code": {"text": code}}
    return ResourceWrite("Observation", id, body, hashlib.sha256(json.dumps(body).encode()).hexdigest())


async def test_fhir_index_rebuild_keeps_newer_versions_and_drops_what_the_store_lacks(tmp_path: Path) -> None:
    resources = SqliteResources(tmp_path / "fhir.sqlite")
    await resources.start()
    try:
        [first] = await resources.write([observation("o1", "one")])
        await resources.index([(first.stored, IndexEntries(terms=frozenset({"code|old"})))])
        stray = StoredResource("Observation", "stray", 1, datetime(2024, 1, 2, tzinfo=UTC), "0" * 64, b"{}")
        await resources.index([(stray, IndexEntries(terms=frozenset({"code|x"})))])
        [second] = await resources.write([observation("o1", "two")])  # written and indexed meanwhile
        await resources.index([(second.stored, IndexEntries(terms=frozenset({"code|new"})))])

        async def read_before() -> AsyncIterator[Sequence[tuple[StoredResource, IndexEntries]]]:
            yield [(first.stored, IndexEntries(terms=frozenset({"code|old"})))]

        assert await resources.rebuild(read_before()) == 1
        page = await resources.search(SearchQuery("Observation"))
        assert [(stored.id, stored.version_id) for stored in page.resources] == [("o1", 2)]
    finally:
        await resources.close()
