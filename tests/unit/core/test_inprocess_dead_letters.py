"""The in-process bus hands dead letters to a dead-letter consumer, as RabbitMQ's ``<queue>.dead`` does."""

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from lucerna.core.events.codec import encode
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.events.ports import DeadLetter, Envelope, PermanentError
from lucerna.core.events.topology import QueueSpec, Topology
from lucerna.events.v1 import events_pb2

TOPOLOGY = Topology(
    exchange="test.events",
    dead_letter_exchange="test.dead",
    queues=(QueueSpec("work", ("study.ready",), delivery_limit=1),),
)


@pytest.fixture
async def bus() -> AsyncIterator[InProcessBus]:
    bus = InProcessBus(
        topology=TOPOLOGY, retry_base_delay=0.001, retry_max_delay=0.002, shutdown_grace=1, max_held=3
    )
    await bus.start()
    yield bus
    await bus.close()


def _event(uid: str) -> Envelope:
    return encode("study.ready", events_pb2.StudyReady(study_instance_uid=uid), correlation_id=uid)


async def _until(condition: Callable[[], object]) -> None:
    async with asyncio.timeout(2.0):
        while not condition():  # noqa: ASYNC110 - polling state the bus changes
            await asyncio.sleep(0.001)


async def _refuse(envelope: Envelope) -> None:
    raise PermanentError(f"cannot use {envelope.correlation_id}")


async def test_dead_letters_reach_the_consumer_with_their_reason(bus: InProcessBus) -> None:
    await bus.consume("work", _refuse)
    await bus.publish(_event("1.1"))  # dead before any dead-letter consumer exists
    await _until(lambda: bus.dead_letters("work"))
    received: list[DeadLetter] = []

    async def collect(dead: DeadLetter) -> None:
        received.append(dead)

    await bus.consume_dead_letters("work", collect)
    await bus.publish(_event("1.2"))
    await _until(lambda: len(received) == 2)
    assert [d.envelope.correlation_id for d in received] == ["1.1", "1.2"]
    assert {d.queue for d in received} == {"work"}
    assert received[1].reason == "permanent: cannot use 1.2"
    assert received[0].at <= received[1].at


async def test_retries_exhausted_are_dead_letters_too(bus: InProcessBus) -> None:
    async def crash(_: Envelope) -> None:
        raise RuntimeError("worker crashed")

    received: list[DeadLetter] = []

    async def collect(dead: DeadLetter) -> None:
        received.append(dead)

    await bus.consume("work", crash)
    await bus.consume_dead_letters("work", collect)
    await bus.publish(_event("2.1"))
    await _until(lambda: received)
    assert received[0].reason == "delivery_limit: RuntimeError: worker crashed"
    assert received[0].envelope.delivery_count == 1


async def test_a_failing_dead_letter_handler_gets_the_letter_again(bus: InProcessBus) -> None:
    calls: list[str] = []

    async def flaky(dead: DeadLetter) -> None:
        calls.append(dead.envelope.correlation_id)
        if len(calls) < 3:
            raise RuntimeError("store down")

    await bus.consume("work", _refuse)
    await bus.consume_dead_letters("work", flaky)
    await bus.publish(_event("3.1"))
    await _until(lambda: len(calls) == 3)
    await asyncio.sleep(0.02)
    assert calls == ["3.1", "3.1", "3.1"]  # delivered until handled, then no more


async def test_waiting_dead_letters_are_bounded(bus: InProcessBus) -> None:
    await bus.consume("work", _refuse)
    for n in range(5):
        await bus.publish(_event(f"4.{n}"))
        await _until(lambda n=n: len(bus.dead_letters("work")) == n + 1)
    received: list[str] = []

    async def collect(dead: DeadLetter) -> None:
        received.append(dead.envelope.correlation_id)

    await bus.consume_dead_letters("work", collect, prefetch=1)
    await _until(lambda: len(received) == 3)
    await asyncio.sleep(0.02)
    assert received == ["4.2", "4.3", "4.4"]  # max_held = 3: the oldest two were dropped


async def test_consuming_dead_letters_checks_its_arguments(bus: InProcessBus) -> None:
    async def ignore(_: DeadLetter) -> None:
        return None

    with pytest.raises(KeyError, match="not in the topology"):
        await bus.consume_dead_letters("nope", ignore)
    with pytest.raises(ValueError, match="prefetch"):
        await bus.consume_dead_letters("work", ignore, prefetch=0)
