"""The delivery outbox on SQLite and the worker that sends it, against a receiver in the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from lucerna.fhir.deliveries import (
    Delivery,
    DeliveryState,
    DeliveryWorker,
    RetryPolicy,
    SqliteDeliveryOutbox,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
URL = "http://hospital.example/fhir"


def delivery(key: str, at: datetime = T0, max_attempts: int = 0) -> Delivery:
    return Delivery(
        key=key,
        kind="push",
        url=URL,
        body=b'{"resourceType":"Bundle","type":"transaction"}',
        created_at=at,
        next_attempt_at=at,
        max_attempts=max_attempts,
    )


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[SqliteDeliveryOutbox]:
    store = SqliteDeliveryOutbox(tmp_path / "deliveries.sqlite")
    await store.start()
    yield store
    await store.close()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Receiver:
    """An HTTP receiver whose answer the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.bodies: list[bytes] = []
        self.headers: list[httpx.Headers] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.content)
        self.headers.append(request.headers)
        if self.status == 0:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(self.status, json={"resourceType": "OperationOutcome"})


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
def worker(outbox: SqliteDeliveryOutbox, receiver: Receiver) -> Callable[[Clock], DeliveryWorker]:
    def make(clock: Clock) -> DeliveryWorker:
        client = httpx.AsyncClient(transport=httpx.MockTransport(receiver.handle))
        return DeliveryWorker(
            outbox,
            client,
            policy=RetryPolicy(
                base=timedelta(seconds=2), cap=timedelta(seconds=30), lease=timedelta(seconds=60)
            ),
            headers=lambda d: {"Authorization": "Bearer push-token"} if d.kind == "push" else {},
            clock=clock,
        )

    return make


async def test_adding_the_same_key_twice_keeps_one(outbox: SqliteDeliveryOutbox) -> None:
    await outbox.add([delivery("push:job-1"), delivery("push:job-1"), delivery("push:job-2")])
    assert [d.key for d in await outbox.outstanding()] == ["push:job-1", "push:job-2"]


async def test_a_claimed_delivery_is_not_claimed_again_until_its_lease_ends(
    outbox: SqliteDeliveryOutbox,
) -> None:
    await outbox.add([delivery("push:job-1")])
    lease = timedelta(seconds=60)
    assert [d.key for d in await outbox.claim(T0, lease, 10)] == ["push:job-1"]
    assert await outbox.claim(T0 + timedelta(seconds=59), lease, 10) == []
    assert [d.key for d in await outbox.claim(T0 + lease, lease, 10)] == ["push:job-1"]


async def test_delivered_once_the_receiver_answers_2xx(
    outbox: SqliteDeliveryOutbox, receiver: Receiver, worker: Callable[[Clock], DeliveryWorker]
) -> None:
    await outbox.add([delivery("push:job-1")])
    assert await worker(Clock()).run_once() == 1
    assert receiver.bodies == [delivery("push:job-1").body]
    assert receiver.headers[0]["content-type"] == "application/fhir+json"
    assert receiver.headers[0]["authorization"] == "Bearer push-token"
    assert await outbox.outstanding() == []
    await outbox.add([delivery("push:job-1")])  # a redelivered result is not pushed again
    assert await outbox.outstanding() == []


async def test_a_receiver_that_is_down_gets_it_later_with_backoff(
    outbox: SqliteDeliveryOutbox, receiver: Receiver, worker: Callable[[Clock], DeliveryWorker]
) -> None:
    await outbox.add([delivery("push:job-1")])
    clock = Clock()
    sender = worker(clock)
    receiver.status = 0  # connection refused
    assert await sender.run_once() == 1
    [waiting] = await outbox.outstanding()
    assert (waiting.attempts, waiting.state) == (1, DeliveryState.PENDING)
    assert waiting.next_attempt_at == T0 + timedelta(seconds=2)
    assert "ConnectError" in waiting.last_error
    receiver.status = 503
    clock.now = T0 + timedelta(seconds=2)
    assert await sender.run_once() == 1
    [waiting] = await outbox.outstanding()
    assert waiting.attempts == 2
    assert waiting.next_attempt_at == clock.now + timedelta(seconds=4)
    assert await sender.run_once() == 0  # not due yet
    receiver.status = 201
    clock.now += timedelta(seconds=4)
    assert await sender.run_once() == 1
    assert await outbox.outstanding() == []
    assert len(receiver.bodies) == 3


async def test_a_refusal_is_dead_at_once_and_kept_for_an_operator(
    outbox: SqliteDeliveryOutbox, receiver: Receiver, worker: Callable[[Clock], DeliveryWorker]
) -> None:
    await outbox.add([delivery("push:job-1")])
    receiver.status = 422
    clock = Clock()
    await worker(clock).run_once()
    [dead] = await outbox.outstanding(DeliveryState.DEAD)
    assert dead.attempts == 1
    assert dead.last_error.startswith("HTTP 422")
    clock.now += timedelta(hours=1)
    assert await worker(clock).run_once() == 0
    assert await outbox.outstanding(DeliveryState.PENDING) == []


async def test_backoff_is_capped_and_limited_deliveries_die(
    outbox: SqliteDeliveryOutbox, receiver: Receiver, worker: Callable[[Clock], DeliveryWorker]
) -> None:
    await outbox.add([delivery("notify:sub-1:1", max_attempts=3)])
    receiver.status = 500
    clock = Clock()
    sender = worker(clock)
    for _ in range(3):
        assert await sender.run_once() == 1
        [current] = await outbox.outstanding()
        clock.now = current.next_attempt_at
    assert current.state is DeliveryState.DEAD
    assert RetryPolicy(cap=timedelta(seconds=30)).delay(10) == timedelta(seconds=30)
