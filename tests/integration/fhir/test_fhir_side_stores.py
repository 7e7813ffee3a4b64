"""The FHIR service's study store and delivery outbox: one contract, on SQLite and on FerretDB."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lucerna.events.v1 import events_pb2
from lucerna.fhir.deliveries import (
    Delivery,
    DeliveryOutbox,
    DeliveryState,
    MongoDeliveryOutbox,
    SqliteDeliveryOutbox,
)
from lucerna.fhir.studies import MongoStudyStore, SqliteStudyStore, StudyStore

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "mongodb"])
async def studies(
    request: pytest.FixtureRequest, tmp_path: Path, mongodb_url: str, mongodb_database: str
) -> AsyncIterator[StudyStore]:
    store: StudyStore
    if request.param == "sqlite":
        store = SqliteStudyStore(tmp_path / "studies.sqlite")
    else:
        store = MongoStudyStore(mongodb_url, mongodb_database)
    await store.start()
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", "mongodb"])
async def outboxes(
    request: pytest.FixtureRequest, tmp_path: Path, mongodb_url: str, mongodb_database: str
) -> AsyncIterator[tuple[DeliveryOutbox, DeliveryOutbox]]:
    """Two handles on one outbox, as two FHIR processes have."""
    made: list[Any] = []
    for _ in range(2):
        if request.param == "sqlite":
            made.append(SqliteDeliveryOutbox(tmp_path / "deliveries.sqlite"))
        else:
            made.append(MongoDeliveryOutbox(mongodb_url, mongodb_database))
    for outbox in made:
        await outbox.start()
    yield made[0], made[1]
    for outbox in made:
        await outbox.close()


def ready(burst: int, instances: int) -> events_pb2.StudyReady:
    return events_pb2.StudyReady(
        study_instance_uid="1.2.3.4",
        burst=burst,
        total_instances=instances,
        patient_id="P1",
        patient_name="DOE^J",
    )


async def test_a_later_burst_replaces_an_earlier_one_never_the_reverse(studies: StudyStore) -> None:
    assert await studies.get("1.2.3.4") is None
    assert await studies.put(ready(1, 10))
    assert await studies.put(ready(2, 15))
    assert not await studies.put(ready(1, 10))  # a late redelivery of burst 1
    kept = await studies.get("1.2.3.4")
    assert kept is not None
    assert (kept.burst, kept.total_instances, kept.patient_name) == (2, 15, "DOE^J")
    assert await studies.put(ready(2, 15))  # the same burst again is harmless
    assert await studies.ping()


def delivery(key: str, at: datetime = T0) -> Delivery:
    return Delivery(key=key, kind="push", url="http://h/fhir", body=b"{}", created_at=at, next_attempt_at=at)


async def test_two_processes_never_claim_the_same_delivery(
    outboxes: tuple[DeliveryOutbox, DeliveryOutbox],
) -> None:
    first, second = outboxes
    await first.add([delivery(f"push:job-{n}", T0 + timedelta(milliseconds=n)) for n in range(20)])
    await second.add([delivery("push:job-0")])  # already there: kept once
    lease = timedelta(seconds=30)
    claims = await asyncio.gather(
        *(outbox.claim(T0 + timedelta(seconds=1), lease, 8) for outbox in (first, second))
    )
    keys = [d.key for claim in claims for d in claim]
    assert len(keys) == len(set(keys)) >= 8  # each claimed once; a lost race leaves it to the winner
    rest = await first.claim(T0 + timedelta(seconds=2), lease, 100)
    assert sorted(d.key for d in rest) == sorted({f"push:job-{n}" for n in range(20)} - set(keys))
    assert await second.claim(T0 + timedelta(seconds=3), lease, 100) == []  # all leased now


async def test_outcomes_are_kept_and_delivered_ones_never_come_back(
    outboxes: tuple[DeliveryOutbox, DeliveryOutbox],
) -> None:
    outbox, _ = outboxes
    await outbox.add([delivery("push:a"), delivery("push:b", T0 + timedelta(seconds=1))])
    [a, b] = await outbox.claim(T0 + timedelta(seconds=5), timedelta(seconds=30), 10)
    await outbox.delivered(a.key)
    failed = Delivery(
        key=b.key,
        kind=b.kind,
        url=b.url,
        body=b.body,
        created_at=b.created_at,
        next_attempt_at=T0 + timedelta(minutes=1),
        attempts=1,
        state=DeliveryState.DEAD,
        last_error="HTTP 422: refused",
    )
    await outbox.retry_later(failed)
    await outbox.add([delivery("push:a")])
    assert await outbox.outstanding(DeliveryState.PENDING) == []
    [dead] = await outbox.outstanding()
    assert (dead.key, dead.state, dead.attempts, dead.last_error) == (
        "push:b",
        DeliveryState.DEAD,
        1,
        "HTTP 422: refused",
    )
    assert await outbox.claim(T0 + timedelta(hours=1), timedelta(seconds=30), 10) == []
    assert await outbox.ping()
