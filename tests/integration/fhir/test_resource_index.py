"""The FHIR search index's contract, run on both adapters: SQLite (embedded) and Elasticsearch.

Versions to index are made by a SQLite store (the SQLite index answers from the store's versions in
the same file; Elasticsearch keeps its own copy). ``search.matches`` is the reference for criteria.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lucerna.fhir.elastic_index import ElasticResourceIndex
from lucerna.fhir.search import matches
from lucerna.fhir.sqlite_store import SqliteResources
from lucerna.fhir.store import (
    Criterion,
    DateComparator,
    DateComparison,
    DateCriterion,
    IndexEntries,
    PrefixCriterion,
    ResourceIndex,
    ResourceWrite,
    SearchQuery,
    SortKey,
    StoredResource,
    TermCriterion,
)
from tests.integration.elastic_indexes import drop

DAY = timedelta(days=1)
BASE = datetime(2024, 3, 1, tzinfo=UTC)
OPEN_START = datetime.min.replace(tzinfo=UTC)
OPEN_END = datetime.max.replace(tzinfo=UTC)


@dataclass
class Setup:
    index: ResourceIndex
    store: SqliteResources

    async def put(self, resource_type: str, id: str, content: str = "") -> StoredResource:
        """A new version of a resource in the store (not yet indexed)."""
        resource = {"resourceType": resource_type, "id": id, "text": {"div": content}}
        (outcome,) = await self.store.write([ResourceWrite(resource_type, id, resource, f"{id}-{content}")])
        return outcome.stored

    async def ids(self, query: SearchQuery) -> list[str]:
        return [stored.id for stored in (await self.index.search(query)).resources]


@pytest.fixture(params=["sqlite", "elastic"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    """A started, empty index of each adapter, and the store whose versions it indexes."""
    store = SqliteResources(tmp_path / "fhir.sqlite")
    await store.start()
    index: ResourceIndex = store
    name = f"fhir-test-{uuid.uuid4().hex}"
    if request.param == "elastic":
        index = ElasticResourceIndex(request.getfixturevalue("elasticsearch_url"), name)
        await index.start()
    yield Setup(index, store)
    if isinstance(index, ElasticResourceIndex):
        await drop(index.client, name)
        await index.close()
    await store.close()


def entries(*terms: str, strings: tuple[str, ...] = (), **dates: tuple[datetime, datetime]) -> IndexEntries:
    return IndexEntries(frozenset(terms), frozenset(strings), dict(dates))


def query(
    *criteria: Criterion,
    sort: tuple[SortKey, ...] = (),
    count: int = 20,
    offset: int = 0,
    with_total: bool = True,
) -> SearchQuery:
    return SearchQuery("Observation", criteria, sort, count, offset, with_total)


async def test_ping(setup: Setup) -> None:
    assert await setup.index.ping()


async def test_terms_negation_alternatives_and_conjunction(setup: Setup) -> None:
    a = await setup.put("Observation", "a")
    b = await setup.put("Observation", "b")
    c = await setup.put("Observation", "c")
    other = await setup.put("Patient", "a")
    await setup.index.index(
        [
            (a, entries("code|x", "status|final")),
            (b, entries("code|y", "status|final")),
            (c, entries("code|z")),
            (other, entries("code|x")),
        ]
    )
    assert await setup.ids(query(TermCriterion(("code|x",)))) == ["a"]
    assert await setup.ids(query(TermCriterion(("code|x", "code|y")))) == ["a", "b"]
    assert await setup.ids(query(TermCriterion(("code|x",), negate=True))) == ["b", "c"]
    both = query(TermCriterion(("code|x", "code|z")), TermCriterion(("status|final",)))
    assert await setup.ids(both) == ["a"]
    assert await setup.ids(query()) == ["a", "b", "c"]
    assert await setup.ids(query(TermCriterion(("code|none",)))) == []


async def test_string_prefixes(setup: Setup) -> None:
    items = []
    for id, names in (("a", ("name|doe", "name|john")), ("b", ("name|dow",)), ("c", ("given|doe",))):
        items.append((await setup.put("Observation", id), entries(strings=names)))
    await setup.index.index(items)
    assert await setup.ids(query(PrefixCriterion(("name|do",)))) == ["a", "b"]
    assert await setup.ids(query(PrefixCriterion(("name|doe",)))) == ["a"]
    assert await setup.ids(query(PrefixCriterion(("name|jo", "name|dow")))) == ["a", "b"]
    assert await setup.ids(query(PrefixCriterion(("name|x",)))) == []


async def test_each_date_comparator_follows_the_reference(setup: Setup) -> None:
    spans = {
        "before": (BASE - 3 * DAY, BASE - 2 * DAY),
        "inside": (BASE + timedelta(hours=1), BASE + timedelta(hours=2)),
        "across": (BASE - DAY, BASE + 2 * DAY),
        "after": (BASE + 3 * DAY, BASE + 4 * DAY),
        "open": (BASE + DAY, OPEN_END),
        "micro": (BASE + timedelta(microseconds=1), BASE + timedelta(microseconds=2)),
    }
    items = [(await setup.put("Observation", id), entries(date=span)) for id, span in spans.items()]
    items.append((await setup.put("Observation", "none"), entries()))
    await setup.index.index(items)
    for comparator in DateComparator:
        for start, end in (
            (BASE, BASE + DAY),
            (BASE + timedelta(microseconds=1), BASE + timedelta(microseconds=2)),
        ):
            criterion = DateCriterion("date", (DateComparison(comparator, start, end),))
            expected = sorted(id for id, span in spans.items() if matches(entries(date=span), criterion))
            assert await setup.ids(query(criterion)) == expected, comparator


async def test_sort_ascending_and_descending_with_missing_last(setup: Setup) -> None:
    dates = {"a": BASE + DAY, "b": BASE, "c": None, "d": BASE + DAY, "e": OPEN_START}
    items = []
    for id, start in dates.items():
        found = entries() if start is None else entries(date=(start, start + DAY))
        items.append((await setup.put("Observation", id), found))
    await setup.index.index(items)
    assert await setup.ids(query(sort=(SortKey("date"),))) == ["e", "b", "a", "d", "c"]
    assert await setup.ids(query(sort=(SortKey("date", descending=True),))) == ["a", "d", "b", "e", "c"]
    assert await setup.ids(query(sort=(SortKey("_id", descending=True),))) == ["e", "d", "c", "b", "a"]
    by_both = (SortKey("date", descending=True), SortKey("_id", descending=True))
    assert await setup.ids(query(sort=by_both)) == ["d", "a", "b", "e", "c"]
    assert await setup.ids(query(sort=(SortKey("issued"),))) == ["a", "b", "c", "d", "e"]  # nobody has it


async def test_paging_total_and_count_zero(setup: Setup) -> None:
    items = [(await setup.put("Observation", f"o{n:02d}"), entries("code|x")) for n in range(12)]
    await setup.index.index(items)
    page = await setup.index.search(query(TermCriterion(("code|x",)), count=5, offset=10))
    assert [s.id for s in page.resources] == ["o10", "o11"] and page.total == 12
    page = await setup.index.search(query(count=0))
    assert page.resources == [] and page.total == 12
    page = await setup.index.search(query(count=3, with_total=False))
    assert [s.id for s in page.resources] == ["o00", "o01", "o02"] and page.total is None


async def test_results_are_the_indexed_versions_with_their_bodies(setup: Setup) -> None:
    big = "x" * 40_000 + "é"  # beyond Lucene's 32 KB term limit
    stored = await setup.put("Observation", "o1", big)
    await setup.index.index([(stored, entries("code|x"))])
    (found,) = (await setup.index.search(query())).resources
    assert found == stored
    assert found.body is not None and json.loads(found.body)["text"]["div"] == big


async def test_an_older_version_never_replaces_a_newer_one(setup: Setup) -> None:
    first = await setup.put("Observation", "o1", "one")
    second = await setup.put("Observation", "o1", "two")
    await setup.index.index([(second, entries("code|new"))])
    await setup.index.index([(first, entries("code|old"))])
    assert await setup.ids(query(TermCriterion(("code|old",)))) == []
    (found,) = (await setup.index.search(query(TermCriterion(("code|new",))))).resources
    assert found == second
    await setup.index.index([(second, entries("code|new"))])  # a redelivery
    assert await setup.ids(query(TermCriterion(("code|new",)))) == ["o1"]


async def test_a_deletion_is_unfindable_even_when_an_older_version_comes_late(setup: Setup) -> None:
    first = await setup.put("Observation", "o1", "one")
    await setup.index.index([(first, entries("code|x"))])
    deleted = await setup.store.delete("Observation", "o1")
    assert deleted is not None
    await setup.index.index([(deleted, IndexEntries())])
    page = await setup.index.search(query())
    assert page.resources == [] and page.total == 0
    await setup.index.index([(first, entries("code|x"))])
    assert await setup.ids(query(TermCriterion(("code|x",)))) == []


async def test_clear_forgets_everything(setup: Setup) -> None:
    stored = await setup.put("Observation", "o1")
    await setup.index.index([(stored, entries("code|x"))])
    await setup.index.clear()
    assert (await setup.index.search(query())).total == 0
    await setup.index.index([(stored, entries("code|x"))])
    assert await setup.ids(query(TermCriterion(("code|x",)))) == ["o1"]


# --- Randomised: every adapter answers as search.matches does ------------------------------------

TERMS = [f"{param}|{value}" for param in ("code", "status") for value in "abcdef"]
LETTERS = "abé\U0010ffff"
DATE_PARAMS = ("date", "_lastUpdated")


def random_span(rng: random.Random) -> tuple[datetime, datetime]:
    start = BASE + rng.randrange(-6, 6) * DAY + rng.choice((0, 1)) * timedelta(microseconds=rng.randrange(3))
    end = start + rng.choice((timedelta(microseconds=1), DAY, 3 * DAY))
    roll = rng.random()
    if roll < 0.1:
        return OPEN_START, end
    if roll < 0.2:
        return start, OPEN_END
    return start, end


def random_entries(rng: random.Random) -> IndexEntries:
    terms = frozenset(rng.sample(TERMS, rng.randrange(4)))
    strings = frozenset(
        "name|" + "".join(rng.choices(LETTERS, k=rng.randrange(1, 4))) for _ in range(rng.randrange(3))
    )
    dates = {param: random_span(rng) for param in DATE_PARAMS if rng.random() < 0.7}
    return IndexEntries(terms, strings, dates)


def random_criterion(rng: random.Random) -> Criterion:
    kind = rng.randrange(3)
    if kind == 0:
        return TermCriterion(tuple(rng.sample(TERMS, rng.randrange(1, 4))), negate=rng.random() < 0.3)
    if kind == 1:
        prefixes = (
            "name|" + "".join(rng.choices(LETTERS, k=rng.randrange(0, 3))) for _ in range(rng.randrange(1, 3))
        )
        return PrefixCriterion(tuple(prefixes))
    comparisons = []
    for _ in range(rng.randrange(1, 3)):
        start, end = random_span(rng)
        comparisons.append(DateComparison(rng.choice(list(DateComparator)), start, end))
    return DateCriterion(rng.choice(DATE_PARAMS), tuple(comparisons))


def reference(indexed: dict[str, IndexEntries], search: SearchQuery) -> tuple[list[str], int]:
    """The ids ``search`` should find, in order, and their number: computed with ``search.matches``."""
    found = sorted(id for id, e in indexed.items() if all(matches(e, c) for c in search.criteria))
    for key in reversed(search.sort):
        if key.param == "_id":
            found.sort(reverse=key.descending)
            continue
        present = [id for id in found if key.param in indexed[id].dates]
        present.sort(key=lambda id, param=key.param: indexed[id].dates[param][0], reverse=key.descending)
        found = present + [id for id in found if key.param not in indexed[id].dates]
    return found[search.offset : search.offset + search.count], len(found)


async def test_random_searches_answer_as_the_reference(setup: Setup) -> None:
    rng = random.Random(20261121)
    indexed: dict[str, IndexEntries] = {}
    items = []
    for n in range(300):
        id = f"r{n:03d}"
        indexed[id] = random_entries(rng)
        items.append((await setup.put("Observation", id), indexed[id]))
    others = [(await setup.put("Patient", f"r{n:03d}"), random_entries(rng)) for n in range(20)]
    await setup.index.index(items + others)
    for deleted_id in ("r007", "r150"):
        deleted = await setup.store.delete("Observation", deleted_id)
        assert deleted is not None
        await setup.index.index([(deleted, IndexEntries())])
        del indexed[deleted_id]
    for round in range(150):
        criteria = tuple(random_criterion(rng) for _ in range(rng.randrange(0, 3)))
        sort = tuple(
            SortKey(rng.choice(("date", "_lastUpdated", "_id")), rng.random() < 0.5)
            for _ in range(rng.randrange(3))
        )
        search = SearchQuery(
            "Observation", criteria, sort, count=rng.choice((0, 5, 50, 400)), offset=rng.choice((0, 3, 40))
        )
        expected, total = reference(indexed, search)
        page = await setup.index.search(search)
        assert [s.id for s in page.resources] == expected, (round, search)
        assert page.total == total, (round, search)
