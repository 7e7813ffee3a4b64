"""The messaging port: publish events, consume them from named queues with manual acknowledgement.

Adapters: ``inprocess`` (embedded; single process) and ``rabbitmq`` (aio-pika). Both apply the
topology of ``events.topology`` and give handlers the same at-least-once contract.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class Envelope:
    """One event as it travels: the serialized protobuf body plus the identifiers every event carries.

    ``message_id`` makes consumers idempotent; ``correlation_id`` is the study UID or job id;
    ``headers`` carry W3C trace context (``traceparent``, ``tracestate``).
    """

    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str
    timestamp: datetime
    type: str  # the protobuf full name, e.g. "lucerna.events.v1.StudyReady"
    headers: Mapping[str, str] = field(default_factory=dict)
    redelivered: bool = False
    delivery_count: int = 0  # failed deliveries before this one (RabbitMQ's x-delivery-count)


class PermanentError(Exception):
    """A message that can never succeed (unparseable, invalid): dead-letter it at once, with this reason."""


class PublishError(Exception):
    """The bus did not take the message: no queue is bound to its routing key, or no confirm came in time.

    The caller keeps the event (e.g. in its outbox field) and publishes it again later.
    """


Handler = Callable[[Envelope], Awaitable[None]]
"""Returns normally to acknowledge; raises PermanentError to dead-letter; raises anything else to retry."""


@dataclass(frozen=True)
class DeadLetter:
    """A message that left its queue for good: why, when, and the envelope as last delivered.

    A message dead-lettered because it lacked what every event has carries what it had: an empty
    ``message_id``, ``type`` or ``correlation_id`` where it had none.
    """

    queue: str  # the queue it died in (not its ``.dead`` queue)
    envelope: Envelope
    reason: str
    at: datetime


DeadLetterHandler = Callable[[DeadLetter], Awaitable[None]]
"""Returns normally to take the dead letter off ``<queue>.dead``; raises to have it delivered again
later (a dead letter is never dropped)."""


class MessageBus(Protocol):
    """Durable publish/consume. ``publish`` returns only once the broker has taken the message."""

    async def start(self) -> None:
        """Connect and declare the whole topology (exchange, queues, bindings, dead-letter queues)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def publish(self, envelope: Envelope) -> None: ...

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16) -> None:
        """Start delivering the queue's messages to ``handler`` until ``close``."""
        ...

    async def consume_dead_letters(
        self, queue: str, handler: DeadLetterHandler, *, prefetch: int = 16
    ) -> None:
        """Start delivering the messages dead-lettered from ``queue`` (those in ``<queue>.dead``),
        with the reason each died, to ``handler`` until ``close``."""
        ...
