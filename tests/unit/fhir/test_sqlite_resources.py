"""The embedded FHIR store and index (one SQLite file): what the contract suites do not show."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lucerna.fhir.repository import Repository
from lucerna.fhir.search import parse_search
from lucerna.fhir.sqlite_store import SqliteResources, prefix_successor
from lucerna.fhir.store import ResourceWrite, VersionConflictError
from lucerna.fhir.versions import instant


@pytest.fixture
async def resources(tmp_path: Path) -> AsyncIterator[SqliteResources]:
    made = SqliteResources(tmp_path / "fhir.sqlite")
    await made.start()
    yield made
    await made.close()


def patient(id: str, family: str, if_match: int | None = None) -> ResourceWrite:
    resource = {"resourceType": "Patient", "id": id, "name": [{"family": family}], "birthDate": "1970-05-02"}
    return ResourceWrite("Patient", id, resource, f"sha-{id}-{family}", if_match)


async def test_a_conflict_undoes_the_whole_batch(resources: SqliteResources) -> None:
    await resources.write([patient("p1", "Doe")])
    with pytest.raises(VersionConflictError):
        await resources.write([patient("p2", "Roe"), patient("p1", "Poe", if_match=5)])
    assert await resources.read("Patient", "p2") is None
    current = await resources.read("Patient", "p1")
    assert current is not None and current.version_id == 1


def test_prefix_successor_bounds_exactly_the_strings_with_the_prefix() -> None:
    assert prefix_successor("name|do") == "name|dp"
    assert prefix_successor("a\U0010ffff") == "b"
    assert prefix_successor("\U0010ffff") is None
    assert prefix_successor("") is None
    assert prefix_successor("a\ud7ff") == "a\ue000"  # surrogates cannot be stored: skipped


def test_instants_are_utc_with_milliseconds() -> None:
    assert instant(datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)) == "2026-11-21T10:00:00.123Z"


async def test_the_repository_writes_indexes_searches_and_rebuilds(resources: SqliteResources) -> None:
    repository = Repository(resources, resources)
    await repository.write([patient("p1", "Müller"), patient("p2", "Doe")])
    await repository.delete("Patient", "p2")
    search = parse_search("Patient", [("name", "mull"), ("birthdate", "ge1970")]).query
    assert [s.id for s in (await resources.search(search)).resources] == ["p1"]
    assert await repository.rebuild_index() == 2
    page = await resources.search(parse_search("Patient", [("_sort", "-_lastUpdated")]).query)
    assert [s.id for s in page.resources] == ["p1"] and page.total == 1
