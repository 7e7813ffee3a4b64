"""Subscription notifications: ``fhir.report-published`` in, rest-hook notifications out through the
delivery outbox (durable, retried with backoff), and the handshake that activates a Subscription.

Flow. A Subscription written through the API is stored ``requested`` (``subscriptions.admit``);
``subscription_written`` then adds its handshake to the outbox (key ``handshake:<id>:<version>``).
The delivery worker tells ``settled`` how it ended: taken, the Subscription becomes ``active``;
dead (refused, or ``HANDSHAKE_ATTEMPTS`` failures), it becomes ``error``. Both are writes
conditional on the version that was handshaken, so a client's newer write is never overwritten.
``settled`` runs before the outbox records the outcome, so a crash in between sends the handshake
again rather than leaving the Subscription ``requested``; ``resume`` (at start) re-adds the handshake
of every ``requested`` Subscription, for a crash between the API's write and its ``add``.

Each published report version is matched against the active Subscriptions (found in the index);
each match takes the Subscription's next event number (``event_numbers``) and becomes one delivery
keyed ``notify:<subscription id>:<report>/_history/<vid>``, so a redelivered event adds nothing.
A notification that dies puts its Subscription in ``error`` (the IG's signal that events were lost).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from fhir.resources.R4B.bundle import Bundle
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.events.v1 import events_pb2
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.deliveries import NOTIFICATION, Delivery, DeliveryOutbox
from lucerna.fhir.event_numbers import EventNumbers
from lucerna.fhir.publishing import resource_json
from lucerna.fhir.repository import Repository
from lucerna.fhir.search import index_entries, parse_search
from lucerna.fhir.store import Json, ResourceWrite, StoredResource, VersionConflictError
from lucerna.fhir.subscriptions import (
    Event,
    Status,
    Subscription,
    SubscriptionError,
    event_notification,
    handshake,
    read_subscription,
    status_bundle,
    with_status,
)

log = logging.getLogger(__name__)

HANDSHAKE = "handshake"  # the delivery kind of handshakes
# A handshake answers whether the endpoint works now: a few quick tries, then error.
HANDSHAKE_ATTEMPTS = 3
# Notifications are hints (the receiver can always search for the reports): with the default
# backoff (2 s doubling to 5 min) ten attempts span about a quarter of an hour. An endpoint down
# longer puts the Subscription in error, visibly, instead of piling notifications up in the outbox;
# writing it ``requested`` again re-runs the handshake, and the event numbers show the gap.
NOTIFICATION_ATTEMPTS = 10
PAGE = 200  # Subscriptions read from the index at a time


class Notifier:
    """Handshakes, notifications and ``$status`` for Subscriptions to ``subscriptions.TOPIC``."""

    def __init__(
        self,
        repository: Repository,
        outbox: DeliveryOutbox,
        numbers: EventNumbers,
        *,
        base_url: str = "",
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.repository = repository
        self.outbox = outbox
        self.numbers = numbers
        self.base_url = base_url.rstrip("/")  # "" : notifications carry relative references
        self.wake = wake
        self.clock = clock

    async def on_report_published(self, envelope: Envelope) -> None:
        """Notify every active Subscription whose filters the published report version meets."""
        published = codec.decode(envelope, events_pb2.ReportPublished)
        report = await self._report(published)
        if report is None or report.body is None:
            return
        entries = index_entries(report, json.loads(report.body))
        event = f"{report.reference}/_history/{report.version_id}"
        at = self.clock()
        deliveries: list[Delivery] = []
        async for subscription in self._subscriptions(Status.ACTIVE):
            if not subscription.wants(entries, at):
                continue
            number = await self.numbers.number(subscription.id, event)
            bundle = event_notification(subscription, self.base_url, at, Event(number, report))
            deliveries.append(
                _delivery(f"notify:{subscription.id}:{event}", NOTIFICATION, subscription, bundle, at)
            )
        if deliveries:
            await self.outbox.add(deliveries)
            self.wake()
        log.info("report matched subscriptions", extra={"report": event, "notifications": len(deliveries)})

    async def subscription_written(self, stored: StoredResource) -> None:
        """After a Subscription's write: send its handshake if it waits for one."""
        subscription = _subscription(stored)
        if subscription is None or subscription.status is not Status.REQUESTED:
            return
        at = self.clock()
        bundle = handshake(subscription, self.base_url, at)
        key = f"{HANDSHAKE}:{subscription.id}:{stored.version_id}"
        delivery = _delivery(key, HANDSHAKE, subscription, bundle, at, attempts=HANDSHAKE_ATTEMPTS)
        await self.outbox.add([delivery])
        self.wake()

    async def resume(self) -> int:
        """At start: (re-)add the handshake of every ``requested`` Subscription; how many."""
        done = 0
        async for stored in self._stored(Status.REQUESTED):
            await self.subscription_written(stored)
            done += 1
        return done

    async def settled(self, delivery: Delivery, taken: bool) -> None:
        """The delivery worker's hook: a handshake activates or fails its Subscription, a dead
        notification fails it."""
        if delivery.kind == HANDSHAKE:
            _, id, version = delivery.key.split(":", 2)
            status = Status.ACTIVE if taken else Status.ERROR
            error = None if taken else f"the handshake to {delivery.url} failed: {delivery.last_error}"
            await self._move(id, int(version), Status.REQUESTED, status, error)
        elif delivery.kind == NOTIFICATION and not taken:
            id = delivery.key.split(":", 2)[1]
            current = await self.repository.store.read("Subscription", id)
            if current is not None and not current.deleted:
                error = f"a notification to {delivery.url} was not delivered: {delivery.last_error}"
                await self._move(id, current.version_id, Status.ACTIVE, Status.ERROR, error)

    async def status(self, stored: StoredResource, base: str) -> Bundle:
        """The ``$status`` answer for a stored Subscription (``SubscriptionError`` if it is not one
        this server runs)."""
        if stored.body is None:
            raise SubscriptionError(f"{stored.reference} is deleted")
        subscription = read_subscription(json.loads(stored.body))
        events = await self.numbers.count(subscription.id)
        return status_bundle(subscription, base, self.clock(), events)

    async def _move(self, id: str, version: int, expected: Status, status: Status, error: str | None) -> None:
        """Set the Subscription's status if it is still at ``version`` with status ``expected``."""
        current = await self.repository.store.read("Subscription", id)
        if current is None or current.body is None or current.version_id != version:
            return  # changed since: the newer version has its own handshake
        resource: Json = json.loads(current.body)
        if resource.get("status") != expected.value:
            return
        changed = with_status(resource, status, error)
        write = ResourceWrite("Subscription", id, changed, canonical_sha256(changed), if_match=version)
        try:
            await self.repository.write([write])
        except VersionConflictError:
            return  # a client wrote it meanwhile; its version decides
        log.info("subscription status", extra={"subscription": id, "status": status, "error": error})

    async def _report(self, published: events_pb2.ReportPublished) -> StoredResource | None:
        """The announced version of the report, unless the report is gone."""
        resource_type, _, id = published.diagnostic_report.partition("/")
        current = await self.repository.store.read(resource_type, id)
        if current is None or current.deleted:
            log.info(
                "report is not current; nothing to notify", extra={"report": published.diagnostic_report}
            )
            return None
        version = next(
            (
                item.version_id
                for item in published.resources
                if item.reference == published.diagnostic_report
            ),
            current.version_id,
        )
        if version == current.version_id:
            return current
        return await self.repository.store.vread(resource_type, id, version)

    async def _subscriptions(self, status: Status) -> AsyncIterator[Subscription]:
        async for stored in self._stored(status):
            subscription = _subscription(stored)
            if subscription is not None:
                yield subscription

    async def _stored(self, status: Status) -> AsyncIterator[StoredResource]:
        """Subscriptions with ``status``, from the index, a page at a time."""
        offset = 0
        while True:
            pairs = [
                ("status", status.value),
                ("_sort", "_id"),
                ("_count", str(PAGE)),
                ("_offset", str(offset)),
            ]
            query = parse_search("Subscription", pairs).query
            page = await self.repository.index.search(query)
            for stored in page.resources:
                yield stored
            if len(page.resources) < PAGE:
                return
            offset += PAGE


def _subscription(stored: StoredResource) -> Subscription | None:
    if stored.body is None:
        return None
    try:
        return read_subscription(json.loads(stored.body))
    except SubscriptionError as error:
        # Stored before this server checked Subscriptions, or by another tool: not served.
        log.warning("subscription not served", extra={"subscription": stored.reference, "error": str(error)})
        return None


def _delivery(
    key: str,
    kind: str,
    subscription: Subscription,
    bundle: Bundle,
    at: datetime,
    *,
    attempts: int = NOTIFICATION_ATTEMPTS,
) -> Delivery:
    body = json.dumps(resource_json(bundle), separators=(",", ":"), ensure_ascii=False).encode()
    return Delivery(
        key=key,
        kind=kind,
        url=subscription.endpoint,
        body=body,
        created_at=at,
        next_attempt_at=at,
        max_attempts=attempts,
        headers=dict(subscription.headers),
    )
