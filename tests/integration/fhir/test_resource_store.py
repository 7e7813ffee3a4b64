"""The FHIR resource store's contract, run on both adapters: SQLite (embedded) and MongoDB (FerretDB)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from lucerna.fhir.mongo_store import FEW, MongoResourceStore
from lucerna.fhir.sqlite_store import SqliteResources
from lucerna.fhir.store import ResourceStore, ResourceWrite, StoredResource, VersionConflictError

INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture(params=["sqlite", "mongo"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResourceStore]:
    """A started, empty store of each adapter (on MongoDB: a fresh database, dropped after)."""
    if request.param == "sqlite":
        sqlite = SqliteResources(tmp_path / "fhir.sqlite")
        await sqlite.start()
        yield sqlite
        await sqlite.close()
        return
    # ``mongodb_database`` is async, which getfixturevalue cannot set up from here: its own name.
    url: str = request.getfixturevalue("mongodb_url")
    database = f"lucerna_test_{uuid.uuid4().hex[:12]}"
    mongo = MongoResourceStore(url, database)
    await mongo.start()
    yield mongo
    await mongo.close()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    await client.drop_database(database)
    await client.close()


def write_of(id: str, family: str, if_match: int | None = None) -> ResourceWrite:
    """A Patient write whose hash stands for its content."""
    resource = {"resourceType": "Patient", "id": id, "name": [{"family": family}]}
    return ResourceWrite("Patient", id, resource, sha256=f"sha-{id}-{family}", if_match=if_match)


def body(stored: StoredResource) -> dict[str, Any]:
    assert stored.body is not None
    return json.loads(stored.body)


async def test_ping(store: ResourceStore) -> None:
    assert await store.ping()


async def test_each_changed_write_is_a_new_version_with_its_meta_in_the_body(store: ResourceStore) -> None:
    (first,) = await store.write([write_of("p1", "Doe")])
    (second,) = await store.write([write_of("p1", "Roe")])
    assert first.changed and second.changed
    assert (first.stored.version_id, second.stored.version_id) == (1, 2)
    assert second.stored.last_updated > first.stored.last_updated
    assert second.stored.last_updated.microsecond % 1000 == 0
    assert second.stored.sha256 == "sha-p1-Roe"
    raw = second.stored.body
    assert raw is not None and b" " not in raw  # compact JSON
    meta = body(second.stored)["meta"]
    assert meta["versionId"] == "2" and INSTANT.match(meta["lastUpdated"])
    assert datetime.fromisoformat(meta["lastUpdated"]) == second.stored.last_updated
    assert body(second.stored)["name"] == [{"family": "Roe"}]
    assert await store.read("Patient", "p1") == second.stored


async def test_meta_of_the_resource_is_kept_beside_the_version(store: ResourceStore) -> None:
    resource = {"resourceType": "Patient", "id": "p1", "meta": {"tag": [{"code": "x"}], "versionId": "9"}}
    (outcome,) = await store.write([ResourceWrite("Patient", "p1", resource, "sha")])
    assert body(outcome.stored)["meta"]["tag"] == [{"code": "x"}]
    assert body(outcome.stored)["meta"]["versionId"] == "1"


async def test_an_unchanged_write_keeps_the_current_version(store: ResourceStore) -> None:
    (first,) = await store.write([write_of("p1", "Doe")])
    (again,) = await store.write([write_of("p1", "Doe")])
    assert not again.changed
    assert again.stored == first.stored
    assert (await store.history("Patient", "p1"))[1] == 1


async def test_a_batch_is_written_in_order(store: ResourceStore) -> None:
    outcomes = await store.write([write_of("p1", "Doe"), write_of("p2", "Roe"), write_of("p1", "Poe")])
    assert [(o.stored.id, o.stored.version_id, o.changed) for o in outcomes] == [
        ("p1", 1, True),
        ("p2", 1, True),
        ("p1", 2, True),
    ]
    assert await store.write([]) == []


async def test_if_match_must_name_the_current_version(store: ResourceStore) -> None:
    with pytest.raises(VersionConflictError) as unknown:
        await store.write([write_of("p1", "Doe", if_match=1)])
    assert unknown.value.current is None
    await store.write([write_of("p1", "Doe")])
    await store.write([write_of("p1", "Roe")])
    with pytest.raises(VersionConflictError) as stale:
        await store.write([write_of("p1", "Poe", if_match=1)])
    assert (stale.value.reference, stale.value.expected, stale.value.current) == ("Patient/p1", 1, 2)
    current = await store.read("Patient", "p1")
    assert current is not None and current.version_id == 2
    (outcome,) = await store.write([write_of("p1", "Poe", if_match=2)])
    assert outcome.changed and outcome.stored.version_id == 3


async def test_a_deletion_is_a_version_read_as_deleted(store: ResourceStore) -> None:
    assert await store.delete("Patient", "nobody") is None
    await store.write([write_of("p1", "Doe")])
    with pytest.raises(VersionConflictError):
        await store.delete("Patient", "p1", if_match=7)
    deleted = await store.delete("Patient", "p1", if_match=1)
    assert deleted is not None
    assert (deleted.version_id, deleted.deleted, deleted.body, deleted.sha256) == (2, True, None, "")
    assert await store.read("Patient", "p1") == deleted
    assert await store.delete("Patient", "p1") is None  # already deleted
    assert await store.read_many(["Patient/p1"]) == []
    (again,) = await store.write([write_of("p1", "Doe")])  # the same content as before the deletion
    assert again.changed and again.stored.version_id == 3


async def test_vread_gives_every_version(store: ResourceStore) -> None:
    await store.write([write_of("p1", "Doe")])
    await store.write([write_of("p1", "Roe")])
    await store.delete("Patient", "p1")
    first = await store.vread("Patient", "p1", 1)
    assert first is not None and body(first)["name"] == [{"family": "Doe"}]
    assert body(first)["meta"]["versionId"] == "1"
    second = await store.vread("Patient", "p1", 2)
    assert second is not None and body(second)["name"] == [{"family": "Roe"}]
    third = await store.vread("Patient", "p1", 3)
    assert third is not None and third.deleted
    assert await store.vread("Patient", "p1", 4) is None
    assert await store.vread("Patient", "p2", 1) is None


async def test_instance_history_is_newest_first_with_since_count_and_offset(store: ResourceStore) -> None:
    made = []
    for family in ("A", "B", "C", "D", "E"):
        (outcome,) = await store.write([write_of("p1", family)])
        made.append(outcome.stored)
    await store.write([write_of("p2", "Z")])
    page, total = await store.history("Patient", "p1")
    assert total == 5 and [s.version_id for s in page] == [5, 4, 3, 2, 1]
    assert page[0] == made[-1]
    page, total = await store.history("Patient", "p1", count=2, offset=1)
    assert total == 5 and [s.version_id for s in page] == [4, 3]
    page, total = await store.history("Patient", "p1", since=made[2].last_updated)
    assert total == 3 and [s.version_id for s in page] == [5, 4, 3]
    page, total = await store.history("Patient", "p1", since=made[2].last_updated + timedelta(microseconds=1))
    assert total == 2 and [s.version_id for s in page] == [5, 4]
    page, total = await store.history("Patient", "p1", since=made[1].last_updated, count=2, offset=1)
    assert total == 4 and [s.version_id for s in page] == [4, 3]
    page, total = await store.history("Patient", "p1", count=0)
    assert (page, total) == ([], 5)
    assert await store.history("Patient", "nobody") == ([], 0)


async def test_type_history_spans_the_type_newest_first(store: ResourceStore) -> None:
    # Versions of different resources may share a millisecond: these are apart.
    await store.write([write_of("p1", "A")])
    await asyncio.sleep(0.002)
    await store.write([write_of("p2", "B")])
    await asyncio.sleep(0.002)
    await store.write([write_of("p1", "C")])
    middle = await store.read("Patient", "p1")
    await asyncio.sleep(0.002)
    await store.delete("Patient", "p2")
    other = {"resourceType": "Device", "id": "d1"}
    await store.write([ResourceWrite("Device", "d1", other, "sha-d1")])
    page, total = await store.history("Patient")
    assert total == 4
    assert [(s.id, s.version_id) for s in page] == [("p2", 2), ("p1", 2), ("p2", 1), ("p1", 1)]
    assert all(page[i].last_updated >= page[i + 1].last_updated for i in range(3))
    assert middle is not None
    page, total = await store.history("Patient", since=middle.last_updated, count=1, offset=1)
    assert total == 2 and [(s.id, s.version_id) for s in page] == [("p1", 2)]
    assert (await store.history("Device"))[1] == 1


async def test_read_many_keeps_the_order_asked_and_leaves_out_unknown_and_deleted(
    store: ResourceStore,
) -> None:
    await store.write([write_of(f"p{n}", "Doe") for n in range(1, 4)])
    await store.delete("Patient", "p2")
    found = await store.read_many(["Patient/p3", "Patient/nobody", "Patient/p2", "Patient/p1", "Device/p1"])
    assert [s.reference for s in found] == ["Patient/p3", "Patient/p1"]
    assert await store.read_many([]) == []


async def test_read_many_of_many_references(store: ResourceStore) -> None:
    count = FEW + 5  # beyond the MongoDB adapter's one-by-one lookups
    await store.write([write_of(f"p{n:02d}", "Doe") for n in range(count)])
    asked = [f"Patient/p{n:02d}" for n in reversed(range(count + 3))]
    found = await store.read_many(asked)
    assert [s.reference for s in found] == [f"Patient/p{n:02d}" for n in reversed(range(count))]
    assert all(s.body is not None for s in found)


async def test_iterate_current_gives_every_current_version_in_batches(store: ResourceStore) -> None:
    await store.write([write_of(f"p{n}", "Doe") for n in range(7)])
    await store.write([write_of("p3", "Roe")])
    await store.delete("Patient", "p5")
    await store.write([ResourceWrite("Device", "d1", {"resourceType": "Device", "id": "d1"}, "sha-d1")])
    batches = [batch async for batch in store.iterate_current("Patient", batch=3)]
    assert [len(batch) for batch in batches] == [3, 3, 1]
    current = {s.id: s for batch in batches for s in batch}
    assert sorted(current) == [f"p{n}" for n in range(7)]
    assert current["p3"].version_id == 2 and current["p5"].deleted
    assert [batch async for batch in store.iterate_current("Observation")] == []


async def test_concurrent_writers_of_one_resource_make_consecutive_versions(store: ResourceStore) -> None:
    families = [f"F{n}" for n in range(8)]
    outcomes = await asyncio.gather(*(store.write([write_of("p1", family)]) for family in families))
    made = sorted(outcome.stored.version_id for (outcome,) in outcomes)
    assert made == list(range(1, 9))
    history, total = await store.history("Patient", "p1", count=100)
    assert total == 8
    assert sorted(body(s)["name"][0]["family"] for s in history) == families
    assert [s.version_id for s in history] == list(range(8, 0, -1))
    assert all(history[i].last_updated > history[i + 1].last_updated for i in range(7))
    current = await store.read("Patient", "p1")
    assert current == history[0]


async def test_mongo_a_version_claimed_by_a_writer_that_died_is_completed(
    mongodb_url: str, mongodb_database: str
) -> None:
    store = MongoResourceStore(mongodb_url, mongodb_database)
    await store.start()
    await store.write([write_of("p1", "Doe")])
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_url, tz_aware=True)
    history = client[mongodb_database]["fhir_history"]
    # The writer of version 2 inserted it in history and died before moving the current document.
    orphan = await history.find_one({"_id": "Patient/p1/1"})
    assert orphan is not None
    later = orphan["last_updated"] + timedelta(seconds=1)
    await history.insert_one(
        orphan | {"_id": "Patient/p1/2", "version": 2, "sha256": "sha-p1-Roe", "last_updated": later}
    )
    # An unchanged write (content of version 1) notices version 2 and is then a change.
    (outcome,) = await store.write([write_of("p1", "Doe")])
    assert outcome.changed and outcome.stored.version_id == 3
    assert outcome.stored.last_updated > later
    # The orphan again, then a changed write, and a redelivery of the dead writer's content.
    await history.insert_one(
        orphan | {"_id": "Patient/p1/4", "version": 4, "sha256": "sha-p1-Poe", "last_updated": later}
    )
    await history.update_one({"_id": "Patient/p1/4"}, {"$set": {"last_updated": datetime.now(UTC)}})
    (outcome,) = await store.write([write_of("p1", "Moe")])
    assert outcome.stored.version_id == 5
    (outcome,) = await store.write([write_of("p1", "Poe", if_match=5)])
    assert outcome.changed and outcome.stored.version_id == 6
    _, total = await store.history("Patient", "p1")
    assert total == 6
    await client.close()
    await store.close()


async def test_a_bulk_load_inserts_new_resources_as_they_are_and_leaves_stored_ones_alone(
    store: ResourceStore,
) -> None:
    (existing,) = await store.write([write_of("p1", "Doe")])
    moment = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)

    def loaded(id: str) -> StoredResource:
        data = {
            "resourceType": "Patient",
            "id": id,
            "meta": {"versionId": "1", "lastUpdated": "2026-01-02T03:04:05.006Z"},
        }
        return StoredResource("Patient", id, 1, moment, f"sha-{id}", json.dumps(data).encode())

    batch = [loaded("p1"), *(loaded(f"bulk-{n}") for n in range(30))]
    assert await store.load(batch) == 30
    assert await store.load(batch) == 0  # again: nothing new
    assert await store.read("Patient", "p1") == existing.stored
    assert await store.read("Patient", "bulk-7") == batch[8]
    assert await store.vread("Patient", "bulk-7", 1) == batch[8]
    (next_version,) = await store.write([write_of("bulk-7", "Later")])
    assert next_version.stored.version_id == 2
    assert next_version.stored.last_updated > moment
