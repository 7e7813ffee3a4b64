"""The embedded message bus: one process, the topology of ``events.topology``, no broker.

It behaves like the RabbitMQ adapter towards publishers and handlers: a routing key reaches every
queue bound to it, a queue holds its messages until a consumer takes them, a handler that returns
acknowledges, ``PermanentError`` dead-letters at once, any other exception is retried with backoff
until the queue's delivery limit, and at most ``prefetch`` messages per consumer are in flight.

It is not durable: what is queued, in flight or dead-lettered is gone when the process stops.
Work that must survive a restart keeps its state in the store (the documents' outbox fields) and is
published again from there at start.

Dead letters are kept in ``dead_letters(queue)`` and wait, like RabbitMQ's ``<queue>.dead``, for a
consumer registered with ``consume_dead_letters``; one whose handler raises is delivered again after
a backoff delay, never dropped for that.

It is bounded: a queue holds at most ``max_held`` messages waiting for a consumer (in ``lucerna up``
some queues have none yet, e.g. ``audit.records``), and as many dead letters waiting for a
dead-letter consumer. Past that the oldest waiting message is dropped, with a WARNING log and
``lucerna_bus_dropped_total{queue}`` (``<queue>.dead`` for a dead letter). Nothing durable is lost by
that: events that must not be lost are derived from the store's outboxes, which keep them until
published, and a broker (RabbitMQ) keeps them for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

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
from lucerna.core.metrics import BUS_DROPPED

log = logging.getLogger(__name__)

__all__ = ["DeadLetter", "InProcessBus"]  # DeadLetter is the port's, exported here as before

T = TypeVar("T", Envelope, DeadLetter)


@dataclass
class _Queue:
    spec: QueueSpec
    pending: asyncio.Queue[Envelope] = dataclasses.field(default_factory=asyncio.Queue)
    dead: list[DeadLetter] = dataclasses.field(default_factory=list)
    # The dead letters a dead-letter consumer has not taken yet (RabbitMQ's ``<queue>.dead``).
    dead_waiting: asyncio.Queue[DeadLetter] = dataclasses.field(default_factory=asyncio.Queue)


class InProcessBus:
    """The ``MessageBus`` for ``lucerna up``: every service in one process, no server.

    Each queue holds at most ``max_held`` waiting messages and drops the oldest beyond that (see the
    module docstring): a queue without a consumer must not grow the process's memory for ever.
    """

    def __init__(
        self,
        *,
        topology: Topology = DEFAULT,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        shutdown_grace: float = 10.0,
        max_held: int = 10_000,
    ) -> None:
        if max_held < 1:
            raise ValueError("max_held must be at least 1")
        self._max_held = max_held
        self._topology = topology
        self._retry_base_delay = retry_base_delay
        self._retry_max_delay = retry_max_delay
        self._shutdown_grace = shutdown_grace
        self._queues: dict[str, _Queue] = {}
        self._consumers: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._started = False

    async def start(self) -> None:
        """Create every queue of the topology, so messages wait for consumers that start later."""
        if not self._started:
            self._queues = {spec.name: _Queue(spec) for spec in self._topology.queues}
            self._started = True

    async def close(self) -> None:
        """Stop consuming, let handlers in flight finish for a grace period, then cancel them."""
        self._closing.set()
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers.clear()
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=self._shutdown_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def ping(self) -> bool:
        """Whether the bus takes messages."""
        return self._started and not self._closing.is_set()

    async def publish(self, envelope: Envelope) -> None:
        """Queue a copy of the envelope on every queue bound to its routing key."""
        self._check_open()
        targets = self._topology.queues_for(envelope.routing_key)
        if not targets:
            raise PublishError(f"no queue is bound to routing key {envelope.routing_key!r}")
        for spec in targets:
            copy = dataclasses.replace(
                envelope, headers=dict(envelope.headers), redelivered=False, delivery_count=0
            )
            self._hold(self._queues[spec.name], copy)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16) -> None:
        """Deliver the queue's messages to ``handler``, at most ``prefetch`` at a time, until ``close``."""
        self._check_open()
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        target = self._queues[self._topology.queue(queue).name]
        task = asyncio.create_task(self._consume(target, handler, prefetch), name=f"consume {queue}")
        self._consumers.append(task)

    async def consume_dead_letters(
        self, queue: str, handler: DeadLetterHandler, *, prefetch: int = 16
    ) -> None:
        """Deliver the queue's dead letters (those already there first) to ``handler`` until ``close``;
        one whose handler raises is delivered again after a backoff delay."""
        self._check_open()
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        target = self._queues[self._topology.queue(queue).name]
        task = asyncio.create_task(
            self._consume_dead(target, handler, prefetch), name=f"consume {queue}.dead"
        )
        self._consumers.append(task)

    def dead_letters(self, queue: str) -> list[DeadLetter]:
        """The messages dead-lettered from ``queue`` since start, oldest first."""
        return list(self._queues[self._topology.queue(queue).name].dead)

    def pending(self, queue: str) -> int:
        """How many messages wait in ``queue`` for a consumer (not counting those in flight)."""
        return self._queues[self._topology.queue(queue).name].pending.qsize()

    def _check_open(self) -> None:
        if not self._started:
            raise RuntimeError("the bus is not started")
        if self._closing.is_set():
            raise RuntimeError("the bus is closed")

    async def _consume(self, queue: _Queue, handler: Handler, prefetch: int) -> None:
        slots = asyncio.Semaphore(prefetch)
        while True:
            await slots.acquire()
            try:
                envelope = await queue.pending.get()
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(self._deliver(queue, handler, envelope, slots))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _consume_dead(self, queue: _Queue, handler: DeadLetterHandler, prefetch: int) -> None:
        slots = asyncio.Semaphore(prefetch)
        while True:
            await slots.acquire()
            try:
                dead = await queue.dead_waiting.get()
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(self._deliver_dead(queue, handler, dead, slots))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _deliver_dead(
        self, queue: _Queue, handler: DeadLetterHandler, dead: DeadLetter, slots: asyncio.Semaphore
    ) -> None:
        token = correlation_id.set(dead.envelope.correlation_id or None)
        failures = 0
        try:
            while True:
                try:
                    await handler(dead)
                except Exception as exc:  # noqa: BLE001 - a dead letter is never dropped: deliver it again
                    delay = retry_delay(failures, self._retry_base_delay, self._retry_max_delay)
                    failures += 1
                    log.warning(
                        "dead-letter handler failed; delivering again",
                        extra={
                            "queue": queue.spec.dead_letter_queue,
                            "message_id": dead.envelope.message_id,
                            "retry_in_s": round(delay, 3),
                            "error": f"{type(exc).__name__}: {exc}",
                        },
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), delay)
                    if self._closing.is_set():
                        # Back where it waited, as RabbitMQ keeps it in ``<queue>.dead``.
                        self._hold_in(queue.dead_waiting, dead, queue.spec.dead_letter_queue)
                        return
                else:
                    return
        finally:
            correlation_id.reset(token)
            slots.release()

    async def _deliver(
        self, queue: _Queue, handler: Handler, envelope: Envelope, slots: asyncio.Semaphore
    ) -> None:
        token = correlation_id.set(envelope.correlation_id or None)
        try:
            await handler(envelope)
        except PermanentError as exc:
            self._dead_letter(queue, envelope, f"permanent: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other failure is retried, as the contract says
            await self._retry(queue, envelope, exc)
        finally:
            correlation_id.reset(token)
            slots.release()

    async def _retry(self, queue: _Queue, envelope: Envelope, exc: Exception) -> None:
        failures = envelope.delivery_count + 1
        if failures > queue.spec.delivery_limit:
            self._dead_letter(queue, envelope, f"delivery_limit: {type(exc).__name__}: {exc}")
            return
        delay = retry_delay(envelope.delivery_count, self._retry_base_delay, self._retry_max_delay)
        log.warning(
            "event handler failed; retrying",
            extra={
                "queue": queue.spec.name,
                "message_id": envelope.message_id,
                "delivery_count": envelope.delivery_count,
                "retry_in_s": round(delay, 3),
                "error": f"{type(exc).__name__}: {exc}",
            },
        )
        # Hold the consumer's slot during the delay, like an unacknowledged RabbitMQ delivery.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay)
        self._hold(queue, dataclasses.replace(envelope, redelivered=True, delivery_count=failures))

    def _hold(self, queue: _Queue, envelope: Envelope) -> None:
        """Queue a message for a consumer, dropping the oldest waiting one when the queue is full."""
        self._hold_in(queue.pending, envelope, queue.spec.name)

    def _hold_in(self, waiting: asyncio.Queue[T], item: T, name: str) -> None:
        """Put ``item`` in ``waiting`` (the queue called ``name``), dropping the oldest item when full."""
        if waiting.qsize() >= self._max_held:
            dropped = waiting.get_nowait()
            BUS_DROPPED.labels(name).inc()
            envelope = dropped.envelope if isinstance(dropped, DeadLetter) else dropped
            log.warning(
                "in-process queue full; dropped its oldest message",
                extra={"queue": name, "message_id": envelope.message_id, "max_held": self._max_held},
            )
        waiting.put_nowait(item)

    def _dead_letter(self, queue: _Queue, envelope: Envelope, reason: str) -> None:
        log.error(
            "event dead-lettered",
            extra={"queue": queue.spec.name, "message_id": envelope.message_id, "reason": reason},
        )
        dead = DeadLetter(queue.spec.name, envelope, reason, datetime.now(UTC))
        queue.dead.append(dead)
        self._hold_in(queue.dead_waiting, dead, queue.spec.dead_letter_queue)
