"""Which port answers a QIDO-RS query: the search index for study attribute searches, the store for
the rest (ADR 0004)."""

from typing import Any

import pytest

from lucerna.core.storage.ports import DicomJson, Match, Query
from lucerna.metadata.querying import find

pytestmark = pytest.mark.unit

FROM_INDEX: list[DicomJson] = [{"source": {"vr": "LO", "Value": ["index"]}}]
FROM_STORE: list[DicomJson] = [{"source": {"vr": "LO", "Value": ["store"]}}]


class _Index:
    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.asked: list[Query] = []

    async def query_studies(self, query: Query) -> list[DicomJson] | None:
        self.asked.append(query)
        return FROM_INDEX if self.answers else None


class _Store:
    async def query(self, query: Query) -> list[DicomJson]:
        return FROM_STORE


async def _find(query: Query, *, index_answers: bool = True) -> tuple[list[DicomJson], list[Query]]:
    index = _Index(index_answers)
    found = await find(query, _Store(), index)  # type: ignore[arg-type]
    return found, index.asked


@pytest.mark.parametrize(
    "matches",
    [(), (Match("PatientName", "wildcard", "SMITH*"),), (Match("StudyDate", "range", ("20210301", None)),)],
)
async def test_study_attribute_searches_come_from_the_search_index(matches: Any) -> None:
    query = Query("study", matches)
    assert await _find(query) == (FROM_INDEX, [query])


async def test_the_store_answers_what_the_index_declines() -> None:
    query = Query("study", (Match("PatientName", "wildcard", "SMITH*"),))
    assert await _find(query, index_answers=False) == (FROM_STORE, [query])


@pytest.mark.parametrize(
    "query",
    [
        Query("study", (Match("StudyInstanceUID", "uids", ["1.2.3"]),)),
        Query("study", (Match("PatientName", "wildcard", "S*"), Match("StudyInstanceUID", "uids", ["1.2"]))),
        Query("series", (Match("PatientName", "wildcard", "SMITH*"),)),
        Query("instance"),
    ],
)
async def test_uid_lookups_and_lower_levels_stay_on_the_store(query: Query) -> None:
    assert await _find(query) == (FROM_STORE, [])
