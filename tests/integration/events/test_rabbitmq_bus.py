"""The RabbitMQ bus against a real broker: topology, properties, dead-lettering, retries, restarts.

Every test declares its own exchanges and queues (a random prefix) and deletes them afterwards, so
tests do not see each other's messages on the session's broker.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from lucerna.core.events.codec import decode, encode
from lucerna.core.events.ports import Envelope, PermanentError, PublishError
from lucerna.core.events.rabbitmq import RabbitMqBus, queue_arguments
from lucerna.core.events.topology import QueueSpec, Topology
from lucerna.events.v1 import events_pb2


@dataclass
class Names:
    """A test's own topology, and a plain AMQP connection and channel to look at the broker with."""

    topology: Topology
    connection: AbstractRobustConnection
    admin: AbstractChannel

    def queue(self, short: str) -> str:
        return next(q.name for q in self.topology.queues if q.name.endswith(f".{short}"))


@pytest.fixture
async def admin(rabbitmq_url: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(rabbitmq_url)
    yield connection
    await connection.close()


def _topology(prefix: str) -> Topology:
    return Topology(
        exchange=f"{prefix}.events",
        dead_letter_exchange=f"{prefix}.dead",
        queues=(
            QueueSpec(f"{prefix}.orchestrator", ("study.ready",), delivery_limit=2),
            QueueSpec(f"{prefix}.audit", ("audit.record", "study.*")),
        ),
    )


@pytest.fixture
async def names(rabbitmq_url: str, admin: AbstractRobustConnection) -> AsyncIterator[Names]:
    topology = _topology(f"t{uuid.uuid4().hex[:10]}")
    channel = await admin.channel()
    yield Names(topology, admin, channel)
    # A connection of its own: the admin one may still be reconnecting after a broker restart.
    async with await aio_pika.connect(rabbitmq_url) as connection:
        cleanup = await connection.channel()
        for spec in topology.queues:
            for name in (spec.name, spec.dead_letter_queue):
                await cleanup.queue_delete(name)
        for exchange in (topology.exchange, topology.dead_letter_exchange):
            await cleanup.exchange_delete(exchange)


@pytest.fixture
async def bus(rabbitmq_url: str, names: Names) -> AsyncIterator[RabbitMqBus]:
    bus = RabbitMqBus(
        rabbitmq_url,
        topology=names.topology,
        retry_base_delay=0.05,
        retry_max_delay=0.1,
        reconnect_interval=0.5,
        shutdown_grace=2,
    )
    await bus.start()
    yield bus
    await bus.close()


def _event(routing_key: str = "study.ready", uid: str = "1.2.3") -> Envelope:
    return encode(routing_key, events_pb2.StudyReady(study_instance_uid=uid, burst=1), correlation_id=uid)


async def _until(condition: Callable[[], object], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polling state that handlers change
            await asyncio.sleep(0.02)


async def _get(channel: AbstractChannel, queue: str, seconds: float = 10.0) -> AbstractIncomingMessage:
    """The next message of ``queue``, fetched with basic.get and acknowledged."""
    amqp_queue = await channel.get_queue(queue, ensure=False)
    async with asyncio.timeout(seconds):
        while True:
            message = await amqp_queue.get(fail=False)
            if message is not None:
                await message.ack()
                return message
            await asyncio.sleep(0.05)


async def test_the_whole_topology_is_declared_with_quorum_queues(bus: RabbitMqBus, names: Names) -> None:
    channel = names.admin
    topology = names.topology
    for exchange in (topology.exchange, topology.dead_letter_exchange):
        await channel.declare_exchange(exchange, passive=True)
    for spec in topology.queues:
        await channel.declare_queue(spec.dead_letter_queue, passive=True)
        # Declaring again with the same arguments is accepted: the queue is a quorum queue with
        # this delivery limit and dead-letter setup (any difference is a PRECONDITION_FAILED).
        await channel.declare_queue(spec.name, durable=True, arguments=queue_arguments(topology, spec))
        await channel.declare_queue(
            spec.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
    audit = topology.queue(names.queue("audit"))
    classic = {**queue_arguments(topology, audit), "x-queue-type": "classic"}
    doomed = await names.connection.channel()  # a failed declare closes its channel
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
        await doomed.declare_queue(audit.name, durable=True, arguments=classic)
    # Bindings: study.ready reaches both queues, audit.record only the audit queue.
    await bus.publish(_event("study.ready"))
    await bus.publish(_event("audit.record"))
    assert (await _get(channel, names.queue("orchestrator"))).routing_key == "study.ready"
    keys = {(await _get(channel, names.queue("audit"))).routing_key for _ in range(2)}
    assert keys == {"study.ready", "audit.record"}


async def test_publish_consume_roundtrip_keeps_every_property(bus: RabbitMqBus, names: Names) -> None:
    received: list[Envelope] = []

    async def handler(envelope: Envelope) -> None:
        received.append(envelope)

    await bus.consume(names.queue("orchestrator"), handler, prefetch=4)
    event = encode(
        "study.ready",
        events_pb2.StudyReady(study_instance_uid="1.2.840.1", burst=3, modalities=["CT", "SEG"]),
        correlation_id="1.2.840.1",
        tracestate="lucerna=1",
    )
    await bus.publish(event)
    await _until(lambda: received)
    [got] = received
    assert (got.routing_key, got.body, got.message_id, got.correlation_id, got.type) == (
        event.routing_key,
        event.body,
        event.message_id,
        event.correlation_id,
        event.type,
    )
    assert int(got.timestamp.timestamp()) == int(event.timestamp.timestamp())  # AMQP: whole seconds
    assert got.headers["traceparent"] == event.headers["traceparent"]
    assert got.headers["tracestate"] == "lucerna=1"
    assert (got.redelivered, got.delivery_count) == (False, 0)
    assert decode(got, events_pb2.StudyReady).modalities == ["CT", "SEG"]

    # The raw AMQP properties, as any other client sees them.
    raw = await _get(names.admin, names.queue("audit"))
    assert raw.content_type == "application/protobuf"
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (raw.message_id, raw.correlation_id, raw.type) == (event.message_id, "1.2.840.1", event.type)
    assert raw.timestamp is not None
    assert raw.headers["traceparent"] == event.headers["traceparent"]


async def test_unroutable_message_is_refused(bus: RabbitMqBus) -> None:
    with pytest.raises(PublishError, match="no queue is bound"):
        await bus.publish(_event("nobody.listens"))


async def test_permanent_error_dead_letters_at_once_with_the_reason(bus: RabbitMqBus, names: Names) -> None:
    calls: list[int] = []

    async def handler(envelope: Envelope) -> None:
        calls.append(envelope.delivery_count)
        decode(envelope, events_pb2.AuditRecord)  # a StudyReady: PermanentError

    await bus.consume(names.queue("orchestrator"), handler)
    event = _event()
    await bus.publish(event)
    dead = await _get(names.admin, names.topology.queue(names.queue("orchestrator")).dead_letter_queue)
    assert calls == [0]
    assert dead.message_id == event.message_id
    assert dead.body == event.body
    assert dead.headers["x-lucerna-queue"] == names.queue("orchestrator")
    assert "expected a lucerna.events.v1.AuditRecord" in str(dead.headers["x-lucerna-error"])
    assert dead.headers["traceparent"] == event.headers["traceparent"]


async def test_a_message_without_event_properties_is_dead_lettered_unseen(
    bus: RabbitMqBus, names: Names
) -> None:
    calls: list[Envelope] = []

    async def handler(envelope: Envelope) -> None:
        calls.append(envelope)

    await bus.consume(names.queue("orchestrator"), handler)
    exchange = await names.admin.get_exchange(names.topology.exchange)
    await exchange.publish(aio_pika.Message(b"not protobuf", content_type="text/plain"), "study.ready")
    dead = await _get(names.admin, f"{names.queue('orchestrator')}.dead")
    assert dead.body == b"not protobuf"
    assert "content type 'text/plain'" in str(dead.headers["x-lucerna-error"])
    assert calls == []


async def test_a_failure_is_retried_then_dead_lettered_at_the_delivery_limit(
    bus: RabbitMqBus, names: Names
) -> None:
    seen: list[tuple[bool, int]] = []

    async def handler(envelope: Envelope) -> None:
        seen.append((envelope.redelivered, envelope.delivery_count))
        raise ConnectionError("store unavailable")

    await bus.consume(names.queue("orchestrator"), handler)
    event = _event()
    await bus.publish(event)
    dead = await _get(names.admin, f"{names.queue('orchestrator')}.dead")
    assert seen == [(False, 0), (True, 1), (True, 2)]  # delivery limit 2: three deliveries
    assert dead.message_id == event.message_id
    assert dead.headers["x-first-death-reason"] == "delivery_limit"


async def test_a_failure_then_success_is_acknowledged_once(bus: RabbitMqBus, names: Names) -> None:
    seen: list[int] = []

    async def handler(envelope: Envelope) -> None:
        seen.append(envelope.delivery_count)
        if len(seen) == 1:
            raise TimeoutError

    await bus.consume(names.queue("orchestrator"), handler)
    await bus.publish(_event())
    await _until(lambda: len(seen) == 2)
    await asyncio.sleep(0.5)
    assert seen == [0, 1]
    queue = await names.admin.declare_queue(names.queue("orchestrator"), passive=True)
    assert queue.declaration_result.message_count == 0


async def test_prefetch_bounds_the_handlers_in_flight(bus: RabbitMqBus, names: Names) -> None:
    running = peak = done = 0

    async def handler(envelope: Envelope) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        done += 1

    for i in range(12):
        await bus.publish(_event(uid=f"1.{i}"))
    await bus.consume(names.queue("orchestrator"), handler, prefetch=3)
    await _until(lambda: done == 12)
    assert peak == 3


async def test_a_broker_restart_loses_no_confirmed_message(
    rabbitmq: Any, rabbitmq_url: str, names: Names
) -> None:
    def new_bus(publish_timeout: float) -> RabbitMqBus:
        return RabbitMqBus(
            rabbitmq_url,
            topology=names.topology,
            retry_base_delay=0.05,
            retry_max_delay=0.1,
            reconnect_interval=0.5,
            publish_timeout=publish_timeout,
        )

    bus, impatient = new_bus(60), new_bus(0.5)
    await bus.start()
    await impatient.start()
    queue = names.queue("audit")
    broker_down = asyncio.Event()
    consumed: set[str] = set()
    redelivered: set[str] = set()

    async def handler(envelope: Envelope) -> None:
        if envelope.redelivered:
            redelivered.add(envelope.message_id)
        # The first deliveries are still in flight when the connection drops: their acks fail.
        await broker_down.wait()
        consumed.add(envelope.message_id)

    try:
        await bus.consume(queue, handler, prefetch=5)
        before = [_event("audit.record", uid=f"1.{i}") for i in range(20)]
        for event in before:
            await bus.publish(event)  # returns once the broker confirmed

        # restart() blocks; in a thread, the bus sees the outage as it happens.
        restart = asyncio.create_task(asyncio.to_thread(rabbitmq.restart))
        async with asyncio.timeout(60):
            while await bus.ping():  # noqa: ASYNC110 - nothing signals a lost connection
                await asyncio.sleep(0.02)
        broker_down.set()

        # During the outage a publish waits for the broker, up to the bus's deadline.
        during = _event("audit.record", uid="2.0")
        with pytest.raises(PublishError, match="did not confirm"):
            await impatient.publish(during)
        await bus.publish(during)
        await restart

        after = [_event("audit.record", uid=f"3.{i}") for i in range(5)]
        for event in after:
            await bus.publish(event)
        expected = {e.message_id for e in [*before, during, *after]}
        await _until(lambda: expected <= consumed, seconds=60)
        assert redelivered, "the deliveries in flight at the restart were redelivered"
        assert await bus.ping()
    finally:
        await impatient.close()
        await bus.close()


async def test_garbage_handler_input_never_blocks_the_queue(bus: RabbitMqBus, names: Names) -> None:
    handled: list[str] = []

    async def handler(envelope: Envelope) -> None:
        if envelope.correlation_id == "bad":
            raise PermanentError("bad input")
        handled.append(envelope.correlation_id)

    await bus.consume(names.queue("orchestrator"), handler, prefetch=1)
    await bus.publish(_event(uid="bad"))
    await bus.publish(_event(uid="good"))
    await _until(lambda: handled == ["good"])
