"""Dead letters on the real broker: ``consume_dead_letters`` delivers ``<queue>.dead`` with the reason
each message died, whether this adapter or the broker dead-lettered it, and never drops one."""

import asyncio
from datetime import UTC, datetime, timedelta

import aio_pika

from lucerna.core.events.ports import DeadLetter, Envelope, PermanentError
from lucerna.core.events.rabbitmq import RabbitMqBus
from tests.integration.events import test_rabbitmq_bus as bus_kit
from tests.integration.events.test_rabbitmq_bus import Names, _event, _until

# The bus tests' fixtures: a test's own topology on the session's broker, and a bus on it.
admin, names, bus = bus_kit.admin, bus_kit.names, bus_kit.bus


async def _collect_dead(bus: RabbitMqBus, queue: str) -> list[DeadLetter]:
    received: list[DeadLetter] = []

    async def collect(dead: DeadLetter) -> None:
        received.append(dead)

    await bus.consume_dead_letters(queue, collect)
    return received


async def test_a_permanent_error_reaches_the_dead_letter_consumer_with_its_reason(
    bus: RabbitMqBus, names: Names
) -> None:
    queue = names.queue("orchestrator")

    async def refuse(envelope: Envelope) -> None:
        raise PermanentError(f"study {envelope.correlation_id} is unusable")

    await bus.consume(queue, refuse)
    received = await _collect_dead(bus, queue)
    before = datetime.now(UTC)
    event = _event(uid="1.2.3.4")
    await bus.publish(event)
    await _until(lambda: received)
    [dead] = received
    assert dead.queue == queue
    assert dead.reason == "study 1.2.3.4 is unusable"
    assert dead.envelope.routing_key == "study.ready"  # the original key, not the dead-letter one
    assert (dead.envelope.message_id, dead.envelope.type) == (event.message_id, event.type)
    assert dead.envelope.body == event.body and dead.envelope.correlation_id == "1.2.3.4"
    assert before - timedelta(seconds=1) <= dead.at <= datetime.now(UTC)


async def test_the_broker_dead_letters_after_the_delivery_limit(bus: RabbitMqBus, names: Names) -> None:
    queue = names.queue("orchestrator")  # delivery limit 2

    async def crash(_: Envelope) -> None:
        raise RuntimeError("worker crashed")

    await bus.consume(queue, crash)
    received = await _collect_dead(bus, queue)
    event = _event(uid="5.6.7")
    await bus.publish(event)
    await _until(lambda: received, seconds=20)
    [dead] = received
    assert (dead.queue, dead.reason) == (queue, "delivery_limit")
    assert dead.envelope.routing_key == "study.ready"
    assert dead.envelope.message_id == event.message_id


async def test_a_message_without_the_event_properties_is_a_dead_letter_too(
    bus: RabbitMqBus, names: Names
) -> None:
    queue = names.queue("orchestrator")

    async def never(_: Envelope) -> None:
        raise AssertionError("a malformed message must not reach the handler")

    await bus.consume(queue, never)
    received = await _collect_dead(bus, queue)
    exchange = await names.admin.get_exchange(names.topology.exchange)
    message = aio_pika.Message(b"not protobuf", content_type="text/plain", message_id="m-1")
    await exchange.publish(message, "study.ready")
    await _until(lambda: received)
    [dead] = received
    assert dead.reason == "content type 'text/plain' is not application/protobuf"
    assert (dead.envelope.message_id, dead.envelope.type, dead.envelope.body) == ("m-1", "", b"not protobuf")
    assert dead.envelope.routing_key == "study.ready"


async def test_a_failing_dead_letter_handler_gets_the_message_again(bus: RabbitMqBus, names: Names) -> None:
    queue = names.queue("orchestrator")

    async def refuse(_: Envelope) -> None:
        raise PermanentError("unusable")

    calls: list[str] = []

    async def flaky(dead: DeadLetter) -> None:
        calls.append(dead.envelope.message_id)
        if len(calls) < 3:
            raise RuntimeError("store down")

    await bus.consume(queue, refuse)
    await bus.consume_dead_letters(queue, flaky)
    event = _event(uid="8.8")
    await bus.publish(event)
    await _until(lambda: len(calls) == 3)
    await asyncio.sleep(0.5)
    assert calls == [event.message_id] * 3
    dead_queue = await names.admin.declare_queue(names.topology.queue(queue).dead_letter_queue, passive=True)
    assert dead_queue.declaration_result.message_count == 0  # handled: taken off the queue
