"""The sealed-PHI store and the AuditEvent index on MongoDB, against FerretDB v1: the first blob of a
key stays, the index is idempotent, and every search criterion selects what the SQLite adapters do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lucerna.audit.auditevents import (
    AuditEventIndex,
    EventQuery,
    IndexedEvent,
    MongoAuditEventIndex,
    SqliteAuditEventIndex,
)
from lucerna.audit.phi import MongoPhiStore, PhiStore, SqlitePhiStore

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def event(seq: int, patient: str, agent: str, entities: tuple[str, ...], outcome: int = 0) -> IndexedEvent:
    query = seq % 2 == 0
    return IndexedEvent(
        seq=seq,
        key=f"read-{seq}",
        recorded=T0 + timedelta(minutes=seq),
        type="110112" if query else "110110",
        subtype="search-type" if query else "read",
        action="E" if query else "R",
        agent=agent,
        service="fhir",
        outcome=outcome,
        patient=patient,
        entities=entities,
    )


EVENTS = [
    event(0, "ix-p1", "ehr", ("DiagnosticReport/r1", "DiagnosticReport/r2")),
    event(1, "ix-p1", "pacs", ("DiagnosticReport/r1",)),
    event(2, "ix-p2", "ehr", ("Observation/o1",)),
    event(3, "", "ehr", (), outcome=4),
]
QUERIES = [
    (EventQuery(), [3, 2, 1, 0]),
    (EventQuery((("patient", ("ix-p1",)),)), [1, 0]),
    (EventQuery((("entity", ("DiagnosticReport/r1",)), ("agent", ("ehr",)))), [0]),
    (EventQuery((("entity", ("DiagnosticReport/r2", "Observation/o1")),)), [2, 0]),
    (EventQuery((("type", ("110110",)), ("outcome", (4,)))), [3]),
    (EventQuery((("action", ("R",)),)), [3, 1]),
    (EventQuery(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)), [2, 1]),
    (EventQuery(count=2, offset=1), [2, 1]),
]


@pytest.fixture(params=["mongodb", "sqlite"])
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path, mongodb_url: str, mongodb_database: str
) -> AsyncIterator[tuple[PhiStore, AuditEventIndex]]:
    phi: PhiStore
    index: AuditEventIndex
    if request.param == "mongodb":
        phi, index = (
            MongoPhiStore(mongodb_url, mongodb_database),
            MongoAuditEventIndex(mongodb_url, mongodb_database),
        )
    else:
        phi, index = (
            SqlitePhiStore(tmp_path / "phi.sqlite"),
            SqliteAuditEventIndex(tmp_path / "events.sqlite"),
        )
    await phi.start()
    await index.start()
    yield phi, index
    await index.close()
    await phi.close()


async def test_the_first_blob_of_a_key_stays(stores: tuple[PhiStore, AuditEventIndex]) -> None:
    phi, _ = stores
    assert await phi.keep_first([("a", b"first a"), ("b", b"first b"), ("a", b"second a")]) == [
        b"first a",
        b"first b",
        b"first a",
    ]
    assert await phi.keep_first([("b", b"again b"), ("c", b"first c")]) == [b"first b", b"first c"]
    assert await phi.get("b") == b"first b"
    assert await phi.get("missing") is None


async def test_the_index_is_idempotent_and_searched_alike(stores: tuple[PhiStore, AuditEventIndex]) -> None:
    _, index = stores
    assert await index.put(EVENTS[:2]) == [True, True]
    assert await index.put(EVENTS) == [False, False, True, True]
    assert await index.get(0) == EVENTS[0]
    assert await index.get(9) is None
    for query, expected in QUERIES:
        found, total = await index.search(query)
        assert [e.seq for e in found] == expected, query
        assert total == (4 if query.offset else len(expected))
    _, none = await index.search(EventQuery(with_total=False))
    assert none is None
