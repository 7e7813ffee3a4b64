"""Audit records of stored instances: published right after the write, relayed from the store later.

The metadata store puts every newly stored instance in its audit outbox by the same write that
stores it (``MetadataStore.put_instances``), so an instance is never kept without its audit record
being due. The ingestion call sends the records at once through the audit trail (the bus, or the
audit service's channel: ``lucerna.core.audit_trail``) and clears them from the outbox; what the
trail did not take (broker or audit service down, no confirm in time) stays there, and
``AuditRelay`` sends it once the trail is back. Message ids are deterministic
(``instance-stored:<sop>:<sha256>``), so a record published twice (a relay beside a slow hot path,
two replicas) is recognised downstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.storage.ports import InstanceRecord, MetadataStore
from lucerna.ingestion import events, metrics

log = logging.getLogger(__name__)

# The ingestion call waits no longer than this for the trail; the relay publishes what is left.
PUBLISH_TIMEOUT_SECONDS = 2.0
# The relay leaves younger records to the ingestion call that stored them (still publishing them).
RELAY_AFTER = timedelta(seconds=10)
RELAY_BATCH = 100


async def publish_stored(
    metadata: MetadataStore,
    trail: AuditTrail,
    records: Sequence[InstanceRecord],
    traceparent: str | None = None,
) -> int:
    """Publish the audit records of newly stored instances and clear them from the outbox; those
    the trail refuses stay in the outbox for the relay. Returns how many were published."""
    if not records:
        return 0
    results = await asyncio.gather(
        *(_publish(trail, record, traceparent) for record in records), return_exceptions=True
    )
    published = [r.sop_instance_uid for r, result in zip(records, results, strict=True) if result is None]
    if len(published) < len(records):
        error = next(result for result in results if result is not None)
        metrics.EVENT_FAILURES.labels("audit.record").inc(len(records) - len(published))
        log.warning(
            "%d audit records not published; they stay in the audit outbox for the relay: %r",
            len(records) - len(published),
            error,
        )
    if published:
        try:
            await metadata.clear_audit(published)
        except Exception:  # they stay in the outbox: the relay publishes them again, with the same ids
            log.exception("could not clear %d published audit records from the outbox", len(published))
    return len(published)


async def _publish(trail: AuditTrail, record: InstanceRecord, traceparent: str | None) -> None:
    async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
        await trail.record(events.instance_stored(record, traceparent))


class AuditRelay:
    """Publishes the audit records left in the store's audit outbox, oldest first."""

    def __init__(
        self, metadata: MetadataStore, trail: AuditTrail, relay_after: timedelta = RELAY_AFTER
    ) -> None:
        self._metadata = metadata
        self._trail = trail
        self._relay_after = relay_after

    async def run_once(self, now: datetime | None = None) -> int:
        """Publish what was stored before ``now`` minus the relay delay; returns how many were published."""
        before = (now or datetime.now(UTC)) - self._relay_after
        relayed = 0
        while True:
            records = await self._metadata.pending_audit(before, RELAY_BATCH)
            published = await publish_stored(self._metadata, self._trail, records)
            relayed += published
            metrics.AUDIT_RELAYED.inc(published)
            if published < len(records) or len(records) < RELAY_BATCH:
                return relayed

    async def run(self, interval: float) -> None:
        """Relay every ``interval`` seconds until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("audit relay failed; retrying")
            await asyncio.sleep(interval)
