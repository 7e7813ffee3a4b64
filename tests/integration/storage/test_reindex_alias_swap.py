"""`lucerna reindex` on the real Elasticsearch: a new generation is filled while searches answer from
the live one, the alias moves in one request, the old index goes, and writes made meanwhile stay."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime

import pytest
from elasticsearch import AsyncElasticsearch

from lucerna.core.storage.elastic import ElasticSearchIndex
from lucerna.core.storage.ports import DicomJson, ReindexRunningError
from lucerna.fhir.elastic_index import ElasticResourceIndex
from lucerna.fhir.store import IndexEntries, SearchQuery, StoredResource
from tests.integration.elastic_indexes import concrete, drop

pytestmark = pytest.mark.integration


def study(uid: str, name: str) -> DicomJson:
    """A study at study level, as the metadata store lists it."""
    return {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00100020": {"vr": "LO", "Value": ["P-" + uid]},
        "00081030": {"vr": "LO", "Value": ["CHEST CT"]},
        "00201208": {"vr": "IS", "Value": [1]},
    }


def tombstone(uid: str) -> DicomJson:
    return {"0020000D": {"vr": "UI", "Value": [uid]}, "00201208": {"vr": "IS", "Value": [0]}}


async def slowly(items: Sequence[DicomJson], started: asyncio.Event) -> AsyncIterator[DicomJson]:
    """The store's studies, read slowly enough for searches and writes to happen during the copy."""
    started.set()
    for item in items:
        await asyncio.sleep(0.05)
        yield item


async def searching(check: Callable[[], Awaitable[bool]], done: asyncio.Event) -> int:
    """Search in a loop until ``done``; every answer must find the studies. The number of searches."""
    count = 0
    while not done.is_set():
        assert await check(), f"search {count} found nothing"
        count += 1
        await asyncio.sleep(0.01)
    return count


@pytest.fixture
async def client(elasticsearch_url: str) -> AsyncIterator[AsyncElasticsearch]:
    elastic = AsyncElasticsearch(elasticsearch_url)
    yield elastic
    await elastic.close()


@pytest.fixture
async def studies(elasticsearch_url: str, client: AsyncElasticsearch) -> AsyncIterator[ElasticSearchIndex]:
    name = f"lucerna-test-{uuid.uuid4().hex[:12]}"
    index = ElasticSearchIndex(elasticsearch_url, name)
    await index.start()
    yield index
    await index.close()
    await drop(client, name)


async def test_first_start_creates_a_generation_behind_the_alias(
    elasticsearch_url: str, studies: ElasticSearchIndex, client: AsyncElasticsearch
) -> None:
    name = studies._index
    assert await concrete(client, name) == [f"{name}-000001"]
    second = ElasticSearchIndex(elasticsearch_url, name)  # as another process would
    await second.start()
    await second.close()
    assert await concrete(client, name) == [f"{name}-000001"]


async def test_studies_reindex_swaps_while_searches_answer_and_keeps_writes(
    studies: ElasticSearchIndex, client: AsyncElasticsearch
) -> None:
    name = studies._index
    store = [study(f"1.2.{n}", f"Doe^John{n}") for n in range(40)]
    await studies.index_studies([*store, study("1.2.99", "Gone^Soon")])
    before = await concrete(client, name)

    async def finds_everyone() -> bool:
        return len(await studies.search("chest", limit=100)) >= 40

    done, started = asyncio.Event(), asyncio.Event()
    loop = asyncio.create_task(searching(finds_everyone, done))
    rebuild = asyncio.create_task(studies.rebuild(slowly(store, started)))
    await started.wait()
    # The indexer goes on during the copy: a new study, a renamed one, a removed one.
    await studies.index_studies([study("1.2.100", "Late^Arrival"), study("1.2.0", "Renamed^Patient")])
    await studies.index_studies([tombstone("1.2.99")])
    with pytest.raises(ReindexRunningError, match="already running"):
        await studies.rebuild(slowly([], asyncio.Event()))
    assert await rebuild == 40
    done.set()
    assert await loop > 10  # searches ran throughout and every one found the studies

    after = await concrete(client, name)
    assert after == [f"{name}-000002"] != before
    assert not await client.indices.exists(index=before[0])  # the old generation is gone
    assert await concrete(client, f"{name}-rebuilding") == []
    await studies.refresh()
    assert await studies.search("arrival") == ["1.2.100"]  # written during the copy, after the read
    assert await studies.fuzzy_patient_names("RENAMED^PATIENT") == ["1.2.0"]  # not the copy's older read
    renamed = await client.get(index=name, id="1.2.0")
    assert renamed["_source"]["patient_name"] == "RENAMED^PATIENT"
    assert await studies.search("gone") == []
    count = await client.count(index=name)
    assert count["count"] == 41  # 40 copied + the late one; the removal's tombstone was dropped


async def test_an_older_concrete_index_becomes_the_alias_at_the_first_reindex(
    elasticsearch_url: str, client: AsyncElasticsearch
) -> None:
    name = f"lucerna-test-{uuid.uuid4().hex[:12]}"
    await client.indices.create(index=name, mappings={"properties": {"study_uid": {"type": "keyword"}}})
    index = ElasticSearchIndex(elasticsearch_url, name)
    await index.start()
    try:
        await index.index_studies([study("1.2.1", "Doe^John")])  # served as it is meanwhile
        assert await index.fuzzy_patient_names("DOE^JOHN") == ["1.2.1"]
        assert await concrete(client, name) == []  # not an alias yet
        assert await index.rebuild(slowly([study("1.2.1", "Doe^John")], asyncio.Event())) == 1
        assert await concrete(client, name) == [f"{name}-000001"]
        assert await index.fuzzy_patient_names("DOE^JOHN") == ["1.2.1"]
        await index.index_studies([study("1.2.2", "Doe^Jane")])
        assert sorted(await index.fuzzy_patient_names("DOE")) == ["1.2.1", "1.2.2"]
    finally:
        await index.close()
        await drop(client, name)


async def test_a_killed_reindex_is_named_and_a_failed_one_leaves_the_live_index(
    studies: ElasticSearchIndex, client: AsyncElasticsearch
) -> None:
    name = studies._index
    await studies.index_studies([study("1.2.1", "Doe^John")])

    async def broken() -> AsyncIterator[DicomJson]:
        yield study("1.2.1", "Doe^John")
        raise OSError("the store went away")

    with pytest.raises(OSError, match="went away"):
        await studies.rebuild(broken())
    assert await concrete(client, name) == [f"{name}-000001"]
    assert not await client.indices.exists(index=f"{name}-000002")  # the half-built one was deleted
    assert await studies.fuzzy_patient_names("DOE^JOHN") == ["1.2.1"]

    # A reindex killed mid-way leaves its index with the rebuilding alias: the next one says so.
    await client.indices.create(index=f"{name}-000002", aliases={f"{name}-rebuilding": {}})
    with pytest.raises(ReindexRunningError, match=rf"DELETE /{name}-000002"):
        await studies.rebuild(slowly([], asyncio.Event()))


def resource(id: str, version: int, code: str) -> tuple[StoredResource, IndexEntries]:
    body = f'{{"resourceType":"Observation","id":"{id}","code":"{code}"}}'.encode()
    stored = StoredResource("Observation", id, version, datetime(2024, 1, 2, tzinfo=UTC), "0" * 64, body)
    return stored, IndexEntries(terms=frozenset({f"code|{code}"}))


async def batches(
    items: Sequence[tuple[StoredResource, IndexEntries]], started: asyncio.Event
) -> AsyncIterator[Sequence[tuple[StoredResource, IndexEntries]]]:
    started.set()
    for item in items:
        await asyncio.sleep(0.05)
        yield [item]


async def test_fhir_reindex_swaps_while_searches_answer_and_keeps_writes(
    elasticsearch_url: str, client: AsyncElasticsearch
) -> None:
    name = f"lucerna-test-{uuid.uuid4().hex[:12]}-fhir"
    index = ElasticResourceIndex(elasticsearch_url, name)
    await index.start()
    try:
        store = [resource(f"o{n}", 1, "x") for n in range(30)]
        await index.index(store)
        everything = SearchQuery("Observation", (), count=100, with_total=True)

        async def finds_everyone() -> bool:
            return ((await index.search(everything)).total or 0) >= 30

        done, started = asyncio.Event(), asyncio.Event()
        loop = asyncio.create_task(searching(finds_everyone, done))
        rebuild = asyncio.create_task(index.rebuild(batches(store, started)))
        await started.wait()
        await index.index([resource("o0", 2, "y"), resource("late", 1, "x")])  # during the copy
        assert await rebuild == 30
        done.set()
        assert await loop > 10

        assert await concrete(client, name) == [f"{name}-000002"]
        assert not await client.indices.exists(index=f"{name}-000001")
        page = await index.search(everything)
        assert page.total == 31
        versions = {stored.id: stored.version_id for stored in page.resources}
        assert versions["o0"] == 2 and "late" in versions  # the copy's version 1 did not replace 2
    finally:
        await index.close()
        await drop(client, name)
