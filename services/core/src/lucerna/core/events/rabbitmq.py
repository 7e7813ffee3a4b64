"""The RabbitMQ message bus (aio-pika): durable topology, publisher confirms, manual acknowledgement.

Topology, declared whole by every service at start (and again by aio-pika after a reconnect): the
topic exchange, per ``QueueSpec`` a durable quorum queue with ``x-delivery-limit`` that dead-letters
at least once (``x-dead-letter-strategy: at-least-once``, which needs ``x-overflow:
reject-publish``) through the direct exchange ``lucerna.dead`` to its own quorum queue
``<queue>.dead``, and the queue's bindings.

Handler outcomes:

- returns: the delivery is acknowledged;
- raises ``PermanentError`` (or the message lacks the properties every event has): a copy goes to
  ``<queue>.dead`` with the reason in the ``x-lucerna-error`` header, confirmed, then the delivery is
  acknowledged. If that copy cannot be published, the delivery is rejected without requeue and the
  broker dead-letters it (reason ``rejected``, no error text);
- raises anything else: after a backoff delay (holding the delivery, so it counts against prefetch)
  the delivery is returned to the queue; once it was returned more than ``delivery_limit`` times the
  broker dead-letters it (``x-first-death-reason: delivery_limit``).

Dead letters: ``consume_dead_letters`` delivers the messages of ``<queue>.dead`` with the reason
each died: the ``x-lucerna-error`` header of a copy this adapter dead-lettered (which also keeps the
original routing key and the time in ``x-lucerna-routing-key`` and ``x-lucerna-dead-at``), else
what the broker wrote in ``x-death`` (``delivery_limit``, ``rejected``, ...). A dead-letter handler
that raises has its message returned to ``<queue>.dead`` after a backoff delay; none is dropped.

Reconnects: the connection is aio-pika's robust one; after a broker restart it reconnects and
re-declares the topology and re-subscribes the consumers. Deliveries that were unacknowledged when
the connection dropped are redelivered by the broker (and count as one failed delivery), so
handlers must be idempotent on ``message_id``, as every Lucerna consumer is. ``publish`` waits
through an outage for up to ``publish_timeout`` seconds, then raises ``PublishError``.

The AMQP timestamp property has a resolution of one second; envelopes read back carry it so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from lucerna.core.events.codec import CONTENT_TYPE
from lucerna.core.events.ports import (
    DeadLetter,
    DeadLetterHandler,
    Envelope,
    Handler,
    PermanentError,
    PublishError,
)
from lucerna.core.events.retry import retry_delay
from lucerna.core.events.topology import DEFAULT, QueueSpec, Topology
from lucerna.core.logging import correlation_id

log = logging.getLogger(__name__)

ERROR_HEADER = "x-lucerna-error"
QUEUE_HEADER = "x-lucerna-queue"
ROUTING_KEY_HEADER = "x-lucerna-routing-key"
DEAD_AT_HEADER = "x-lucerna-dead-at"
_MAX_REASON = 2000

# What a lost connection or channel looks like to a caller; all of it is retried or left to
# redelivery. (aiormq's ChannelInvalidStateError is a RuntimeError.)
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def queue_arguments(topology: Topology, spec: QueueSpec) -> dict[str, Any]:
    """The ``x-`` arguments of a consumer's quorum queue."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": spec.delivery_limit,
        "x-dead-letter-exchange": topology.dead_letter_exchange,
        "x-dead-letter-routing-key": spec.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


DEAD_LETTER_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


class RabbitMqBus:
    """The ``MessageBus`` on RabbitMQ, for deployables that run alone."""

    def __init__(
        self,
        url: str,
        *,
        topology: Topology = DEFAULT,
        publish_timeout: float = 30.0,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        reconnect_interval: float = 2.0,
        shutdown_grace: float = 10.0,
    ) -> None:
        self._url = url
        self._topology = topology
        self._publish_timeout = publish_timeout
        self._retry_base_delay = retry_base_delay
        self._retry_max_delay = retry_max_delay
        self._reconnect_interval = reconnect_interval
        self._shutdown_grace = shutdown_grace
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    async def start(self) -> None:
        """Connect and declare the whole topology; fails if the broker cannot be reached now."""
        if self._connection is not None:
            return
        connection = await aio_pika.connect_robust(
            self._url,
            reconnect_interval=self._reconnect_interval,
            client_properties={"connection_name": "lucerna"},
        )
        try:
            # on_return_raises: a message that no queue takes fails its publish instead of vanishing.
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await self._declare(publisher)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._publisher = publisher

    async def close(self) -> None:
        """Stop consuming, let handlers in flight settle for a grace period, then disconnect."""
        self._closing.set()
        for queue, tag in self._consumers:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await asyncio.wait_for(queue.cancel(tag), 5.0)
        self._consumers.clear()
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=self._shutdown_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
            self._publisher = None

    async def ping(self) -> bool:
        """Whether the connection to the broker is up now."""
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def publish(self, envelope: Envelope) -> None:
        """Publish persistently; return once the broker confirmed, or raise ``PublishError``."""
        message = aio_pika.Message(
            body=envelope.body,
            headers=dict(envelope.headers),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=envelope.message_id,
            correlation_id=envelope.correlation_id,
            timestamp=envelope.timestamp,
            type=envelope.type,
        )
        await self._publish(self._topology.exchange, envelope.routing_key, message, self._publish_timeout)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16) -> None:
        """Deliver the queue's messages to ``handler`` until ``close``, ``prefetch`` unacked at most."""
        if self._connection is None or self._closing.is_set():
            raise RuntimeError("the bus is not started or is closed")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        spec = self._topology.queue(queue)
        # A channel per consumer: its own prefetch, and a failure on it leaves the others alone.
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        amqp_queue = await channel.declare_queue(
            spec.name, durable=True, arguments=queue_arguments(self._topology, spec)
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            # aio-pika runs this in a task of the AMQP channel, cancelled if the connection drops;
            # the handler runs in a task of its own so that it finishes either way.
            task = asyncio.create_task(self._deliver(spec, handler, message))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

        tag = await amqp_queue.consume(on_message, no_ack=False)
        self._consumers.append((amqp_queue, tag))

    async def consume_dead_letters(
        self, queue: str, handler: DeadLetterHandler, *, prefetch: int = 16
    ) -> None:
        """Deliver the messages of ``<queue>.dead`` with the reason each died to ``handler`` until
        ``close``; one whose handler raises goes back to ``<queue>.dead`` after a backoff delay."""
        if self._connection is None or self._closing.is_set():
            raise RuntimeError("the bus is not started or is closed")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        spec = self._topology.queue(queue)
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        dead_queue = await channel.declare_queue(
            spec.dead_letter_queue, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.create_task(self._deliver_dead(spec, handler, message))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

        tag = await dead_queue.consume(on_message, no_ack=False)
        self._consumers.append((dead_queue, tag))

    async def _deliver_dead(
        self, spec: QueueSpec, handler: DeadLetterHandler, message: AbstractIncomingMessage
    ) -> None:
        dead = _dead_letter_of(spec, message)
        token = correlation_id.set(dead.envelope.correlation_id or None)
        try:
            await handler(dead)
        except Exception as exc:  # noqa: BLE001 - a dead letter is never dropped: deliver it again
            count = message.headers.get("x-delivery-count", 0)
            delay = retry_delay(
                count if isinstance(count, int) else 0, self._retry_base_delay, self._retry_max_delay
            )
            log.warning(
                "dead-letter handler failed; returning the message to its queue",
                extra={
                    "queue": spec.dead_letter_queue,
                    "message_id": message.message_id,
                    "retry_in_s": round(delay, 3),
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            await _settle(message.nack(requeue=True), message)
        else:
            await _settle(message.ack(), message)
        finally:
            correlation_id.reset(token)

    async def _declare(self, channel: AbstractChannel) -> None:
        topology = self._topology
        exchange = await channel.declare_exchange(
            topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead_letters = await channel.declare_exchange(
            topology.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for spec in topology.queues:
            dead = await channel.declare_queue(
                spec.dead_letter_queue, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS
            )
            await dead.bind(dead_letters, spec.dead_letter_queue)
            amqp_queue = await channel.declare_queue(
                spec.name, durable=True, arguments=queue_arguments(topology, spec)
            )
            for routing_key in spec.bindings:
                await amqp_queue.bind(exchange, routing_key)
        self._exchanges = {exchange.name: exchange, dead_letters.name: dead_letters}

    async def _publish(
        self, exchange_name: str, routing_key: str, message: aio_pika.Message, within: float
    ) -> None:
        """Publish and wait for the confirm, retrying through lost connections for ``within`` seconds."""
        if self._publisher is None:
            raise RuntimeError("the bus is not started")
        exchange = self._exchanges[exchange_name]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        attempt = 0
        error: BaseException | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PublishError(
                    f"RabbitMQ did not confirm {message.message_id} ({routing_key!r}) within {within:g} s"
                ) from error
            try:
                # While the robust connection reconnects this fails fast or waits for it; either way
                # the loop tries again until the deadline.
                async with asyncio.timeout(remaining):
                    await exchange.publish(message, routing_key, mandatory=True)
            except aiormq.exceptions.PublishError as exc:
                raise PublishError(
                    f"no queue is bound to routing key {routing_key!r} on {exchange_name!r}"
                ) from exc
            except asyncio.CancelledError:
                # aiormq cancels the confirm of a publish whose connection dropped; only a cancel of
                # this task itself ends the retries.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                error = ConnectionError("connection lost before the confirm")
            except _CONNECTION_ERRORS as exc:
                error = exc
            else:
                return
            attempt += 1
            log.warning(
                "publish not confirmed; retrying",
                extra={"routing_key": routing_key, "message_id": message.message_id, "error": repr(error)},
            )
            await asyncio.sleep(min(0.25 * attempt, 2.0, max(deadline - loop.time(), 0)))

    async def _deliver(self, spec: QueueSpec, handler: Handler, message: AbstractIncomingMessage) -> None:
        try:
            envelope = _envelope(message)
        except PermanentError as exc:
            await self._dead_letter(spec, message, str(exc))
            return
        token = correlation_id.set(envelope.correlation_id or None)
        try:
            await handler(envelope)
        except PermanentError as exc:
            await self._dead_letter(spec, message, str(exc))
        except Exception as exc:  # noqa: BLE001 - any other failure is retried, as the contract says
            await self._retry(spec, envelope, message, exc)
        else:
            await _settle(message.ack(), message)
        finally:
            correlation_id.reset(token)

    async def _retry(
        self, spec: QueueSpec, envelope: Envelope, message: AbstractIncomingMessage, exc: Exception
    ) -> None:
        delay = retry_delay(envelope.delivery_count, self._retry_base_delay, self._retry_max_delay)
        log.warning(
            "event handler failed; retrying",
            extra={
                "queue": spec.name,
                "message_id": envelope.message_id,
                "delivery_count": envelope.delivery_count,
                "delivery_limit": spec.delivery_limit,
                "retry_in_s": round(delay, 3),
                "error": f"{type(exc).__name__}: {exc}",
            },
        )
        # Closing cuts the wait short: the message goes back to the queue for the next consumer.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay)
        await _settle(message.nack(requeue=True), message)

    async def _dead_letter(self, spec: QueueSpec, message: AbstractIncomingMessage, reason: str) -> None:
        log.error(
            "event dead-lettered",
            extra={"queue": spec.name, "message_id": message.message_id, "reason": reason},
        )
        headers = dict(message.headers)
        headers.pop("x-delivery-count", None)
        headers[ERROR_HEADER] = reason[:_MAX_REASON]
        headers[QUEUE_HEADER] = spec.name
        headers[ROUTING_KEY_HEADER] = message.routing_key or ""
        headers[DEAD_AT_HEADER] = datetime.now(UTC).isoformat()
        copy = aio_pika.Message(
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            type=message.type,
        )
        try:
            await self._publish(
                self._topology.dead_letter_exchange,
                spec.dead_letter_queue,
                copy,
                min(self._publish_timeout, 10.0),
            )
        except (PublishError, RuntimeError):
            log.exception("could not publish to %s; rejecting instead", spec.dead_letter_queue)
            await _settle(message.reject(requeue=False), message)
        else:
            await _settle(message.ack(), message)


async def _settle(outcome: Any, message: AbstractIncomingMessage) -> None:
    """Send an ack/nack/reject; if the connection is gone, the broker redelivers the message anyway."""
    try:
        await outcome
    except _CONNECTION_ERRORS as exc:
        log.warning(
            "could not settle a delivery; the broker will redeliver it",
            extra={"message_id": message.message_id, "error": repr(exc)},
        )


def _dead_letter_of(spec: QueueSpec, message: AbstractIncomingMessage) -> DeadLetter:
    """A message of ``<queue>.dead`` as a dead letter: its reason, its original routing key and the
    time it died, from this adapter's headers or else from the broker's ``x-death``."""
    raw = message.headers
    death = _first_death(raw.get("x-death"))
    reason = _text(raw.get(ERROR_HEADER)) or _text(raw.get("x-first-death-reason")) or _text(
        death.get("reason")
    )
    routing_keys = death.get("routing-keys")
    original_key = _text(raw.get(ROUTING_KEY_HEADER)) or (
        _text(routing_keys[0]) if isinstance(routing_keys, list) and routing_keys else ""
    )
    at = _timestamp(raw.get(DEAD_AT_HEADER)) or _timestamp(death.get("time")) or datetime.now(UTC)
    headers = {
        key: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        for key, value in raw.items()
        if isinstance(value, str | bytes)
    }
    envelope = Envelope(
        routing_key=original_key or message.routing_key or "",
        body=message.body,
        message_id=message.message_id or "",
        correlation_id=message.correlation_id or "",
        timestamp=message.timestamp or at,
        type=message.type or "",
        headers=headers,
    )
    return DeadLetter(
        queue=_text(raw.get(QUEUE_HEADER)) or _text(raw.get("x-first-death-queue")) or spec.name,
        envelope=envelope,
        reason=reason or "unknown",
        at=at,
    )


def _first_death(value: object) -> dict[str, Any]:
    """The oldest entry of an ``x-death`` header (the broker keeps the most recent first)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[-1]
    return {}


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str | bytes):
        try:
            parsed = datetime.fromisoformat(_text(value))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _envelope(message: AbstractIncomingMessage) -> Envelope:
    """The envelope of a delivery; ``PermanentError`` if it lacks what every Lucerna event has."""
    if message.content_type != CONTENT_TYPE:
        raise PermanentError(f"content type {message.content_type!r} is not {CONTENT_TYPE}")
    if not message.message_id or not message.type:
        raise PermanentError("the message has no message_id or no type")
    raw = message.headers
    count = raw.get("x-delivery-count", 0)
    headers = {
        key: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        for key, value in raw.items()
        if isinstance(value, str | bytes)
    }
    delivery_count = count if isinstance(count, int) else 0
    return Envelope(
        routing_key=message.routing_key or "",
        body=message.body,
        message_id=message.message_id,
        correlation_id=message.correlation_id or "",
        timestamp=message.timestamp or datetime.now(UTC),
        type=message.type,
        headers=headers,
        redelivered=bool(message.redelivered) or delivery_count > 0,
        delivery_count=delivery_count,
    )
