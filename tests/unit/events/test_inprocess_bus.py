"""The embedded bus keeps the topology and handler contract of the RabbitMQ adapter."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import REGISTRY

from lucerna.core.events.codec import encode
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.events.ports import Envelope, Handler, PermanentError, PublishError
from lucerna.core.events.topology import QueueSpec, Topology, topic_matches
from lucerna.core.logging import correlation_id
from lucerna.events.v1 import events_pb2

TOPOLOGY = Topology(
    exchange="test.events",
    dead_letter_exchange="test.dead",
    queues=(
        QueueSpec("orchestrator", ("study.ready",), delivery_limit=2),
        QueueSpec("audit", ("audit.record", "study.*")),
        QueueSpec("inference", ("inference.requested.#",)),
    ),
)


@pytest.fixture
async def bus() -> AsyncIterator[InProcessBus]:
    bus = InProcessBus(topology=TOPOLOGY, retry_base_delay=0.001, retry_max_delay=0.002, shutdown_grace=1)
    await bus.start()
    yield bus
    await bus.close()


def _event(routing_key: str = "study.ready", uid: str = "1.2.3") -> Envelope:
    return encode(routing_key, events_pb2.StudyReady(study_instance_uid=uid), correlation_id=uid)


async def _until(condition: Callable[[], object]) -> None:
    """Poll a condition that handlers make true (they share no event with the test)."""
    async with asyncio.timeout(2.0):
        while not condition():  # noqa: ASYNC110 - polling state the bus changes
            await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("study.ready", "study.ready", True),
        ("study.ready", "study.ready.x", False),
        ("study.*", "study.ready", True),
        ("study.*", "study", False),
        ("study.*", "study.a.b", False),
        ("inference.requested.#", "inference.requested", True),
        ("inference.requested.#", "inference.requested.ct.lesion", True),
        ("#", "anything.at.all", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("*.ready", "study.ready", True),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_queues_for_a_routing_key() -> None:
    assert [q.name for q in TOPOLOGY.queues_for("study.ready")] == ["orchestrator", "audit"]
    assert [q.name for q in TOPOLOGY.queues_for("inference.requested.ct")] == ["inference"]
    assert TOPOLOGY.queues_for("nobody.listens") == ()


async def test_messages_wait_for_a_consumer_in_every_bound_queue(bus: InProcessBus) -> None:
    await bus.publish(_event())
    assert (bus.pending("orchestrator"), bus.pending("audit"), bus.pending("inference")) == (1, 1, 0)
    got: list[Envelope] = []

    async def handler(envelope: Envelope) -> None:
        got.append(envelope)

    await bus.consume("audit", handler)
    await _until(lambda: got)
    assert got[0].message_id and got[0].type == "lucerna.events.v1.StudyReady"
    assert (got[0].redelivered, got[0].delivery_count) == (False, 0)
    assert bus.pending("orchestrator") == 1  # no consumer yet: held, not dropped
    assert bus.dead_letters("audit") == []


async def test_an_unroutable_message_is_refused(bus: InProcessBus) -> None:
    with pytest.raises(PublishError, match="no queue is bound"):
        await bus.publish(_event("nobody.listens"))


async def test_the_bus_must_be_started_and_queues_declared() -> None:
    bus = InProcessBus(topology=TOPOLOGY)
    with pytest.raises(RuntimeError, match="not started"):
        await bus.publish(_event())
    assert not await bus.ping()
    await bus.start()
    assert await bus.ping()

    async def handler(envelope: Envelope) -> None:
        return None

    with pytest.raises(KeyError, match="not in the topology"):
        await bus.consume("typo", handler)
    await bus.close()
    assert not await bus.ping()
    with pytest.raises(RuntimeError, match="closed"):
        await bus.publish(_event())


async def test_a_permanent_error_dead_letters_at_once(bus: InProcessBus) -> None:
    calls = 0

    async def handler(envelope: Envelope) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("not a StudyReady")

    event = _event()
    await bus.publish(event)
    await bus.consume("orchestrator", handler)
    await _until(lambda: bus.dead_letters("orchestrator"))
    [dead] = bus.dead_letters("orchestrator")
    assert calls == 1
    assert dead.reason == "permanent: not a StudyReady"
    assert (dead.queue, dead.envelope.message_id) == ("orchestrator", event.message_id)


async def test_a_failure_is_retried_until_the_delivery_limit(bus: InProcessBus) -> None:
    seen: list[tuple[bool, int]] = []

    async def handler(envelope: Envelope) -> None:
        seen.append((envelope.redelivered, envelope.delivery_count))
        raise ConnectionError("store down")

    await bus.publish(_event())
    await bus.consume("orchestrator", handler)
    await _until(lambda: bus.dead_letters("orchestrator"))
    # Like a quorum queue with x-delivery-limit 2: three deliveries, then dead-lettered.
    assert seen == [(False, 0), (True, 1), (True, 2)]
    [dead] = bus.dead_letters("orchestrator")
    assert dead.reason == "delivery_limit: ConnectionError: store down"
    assert bus.pending("orchestrator") == 0


async def test_a_retried_message_that_succeeds_is_done(bus: InProcessBus) -> None:
    attempts = 0

    async def handler(envelope: Envelope) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TimeoutError

    await bus.publish(_event())
    await bus.consume("orchestrator", handler)
    await _until(lambda: attempts == 2)
    await asyncio.sleep(0.01)
    assert attempts == 2
    assert bus.dead_letters("orchestrator") == []


async def test_concurrency_is_bounded_by_prefetch(bus: InProcessBus) -> None:
    running = peak = done = 0
    release = asyncio.Event()

    async def handler(envelope: Envelope) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done += 1

    for i in range(10):
        await bus.publish(_event(uid=f"1.{i}"))
    await bus.consume("audit", handler, prefetch=3)
    await _until(lambda: running == 3)
    await asyncio.sleep(0.01)
    assert peak == 3
    assert bus.pending("audit") == 7
    release.set()
    await _until(lambda: done == 10)
    assert peak == 3


async def test_competing_consumers_share_a_queue(bus: InProcessBus) -> None:
    got: dict[str, list[str]] = {"a": [], "b": []}

    def handler_for(name: str) -> Handler:
        async def handler(envelope: Envelope) -> None:
            got[name].append(envelope.correlation_id)
            await asyncio.sleep(0.001)

        return handler

    await bus.consume("audit", handler_for("a"), prefetch=1)
    await bus.consume("audit", handler_for("b"), prefetch=1)
    for i in range(20):
        await bus.publish(_event(uid=f"1.{i}"))
    await _until(lambda: len(got["a"]) + len(got["b"]) == 20)
    assert sorted(got["a"] + got["b"]) == sorted(f"1.{i}" for i in range(20))
    assert got["a"] and got["b"]


async def test_the_handler_runs_with_the_correlation_id_for_logs(bus: InProcessBus) -> None:
    seen: list[str | None] = []

    async def handler(envelope: Envelope) -> None:
        seen.append(correlation_id.get())

    await bus.consume("audit", handler)
    await bus.publish(_event(uid="9.8.7"))
    await _until(lambda: seen)
    assert seen == ["9.8.7"]
    assert correlation_id.get() is None


async def test_close_lets_a_handler_in_flight_finish() -> None:
    bus = InProcessBus(topology=TOPOLOGY, shutdown_grace=2)
    await bus.start()
    finished = asyncio.Event()
    started = asyncio.Event()

    async def handler(envelope: Envelope) -> None:
        started.set()
        await asyncio.sleep(0.05)
        finished.set()

    await bus.consume("audit", handler)
    await bus.publish(_event())
    await started.wait()
    await bus.close()
    assert finished.is_set()


async def test_close_cuts_a_retry_backoff_short() -> None:
    bus = InProcessBus(topology=TOPOLOGY, retry_base_delay=60, retry_max_delay=60)
    await bus.start()
    failed = asyncio.Event()

    async def handler(envelope: Envelope) -> None:
        failed.set()
        raise RuntimeError("transient")

    await bus.consume("audit", handler)
    await bus.publish(_event())
    await failed.wait()
    async with asyncio.timeout(2):
        await bus.close()


async def test_a_full_queue_drops_its_oldest_message(caplog: pytest.LogCaptureFixture) -> None:
    bus = InProcessBus(topology=TOPOLOGY, max_held=3)
    await bus.start()
    dropped_before = REGISTRY.get_sample_value("lucerna_bus_dropped_total", {"queue": "orchestrator"}) or 0
    with caplog.at_level(logging.WARNING, logger="lucerna.core.events.inprocess"):
        for i in range(5):
            await bus.publish(_event(uid=f"1.{i}"))
    assert (bus.pending("orchestrator"), bus.pending("audit")) == (3, 3)
    dropped = REGISTRY.get_sample_value("lucerna_bus_dropped_total", {"queue": "orchestrator"})
    assert dropped == dropped_before + 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [getattr(r, "queue", None) for r in warnings].count("orchestrator") == 2
    got: list[str] = []

    async def handler(envelope: Envelope) -> None:
        got.append(envelope.correlation_id)

    await bus.consume("orchestrator", handler)
    await _until(lambda: len(got) == 3)
    assert got == ["1.2", "1.3", "1.4"]  # the newest kept, in order
    await bus.close()
    with pytest.raises(ValueError, match="max_held"):
        InProcessBus(topology=TOPOLOGY, max_held=0)
