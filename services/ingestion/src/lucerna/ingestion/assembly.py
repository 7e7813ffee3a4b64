"""Study assembly: when has a study's burst of instances arrived completely?

A burst ends at a boundary (a DIMSE association ended, a STOW-RS request completed) followed by a
quiet period with no new instance of the study, or, when the boundary was missed (a process died
before marking it, an association never ended), once the study has been idle for the maximum idle
time. The metadata store keeps each burst in its assembly outbox until it is announced: this module
claims the ended bursts (``claim_ready``, a lease), publishes one ``study.ready`` event and its
audit record for each, then acknowledges it (``ack_ready``). A burst whose claimer died before
acknowledging it is claimed again once the lease expires and published again with the same
message ids (``study-ready:<study>:<burst>``), which consumers recognise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.events.ports import Envelope, MessageBus
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.core.storage.ports import MetadataStore, ReadyStudy
from lucerna.ingestion import events, metrics

log = logging.getLogger(__name__)

CLAIM_BATCH = 100


async def end_of_burst(
    metadata: MetadataStore, study_uids: Iterable[str], at: datetime | None = None
) -> None:
    """Mark the boundary of these studies' bursts (an association ended, a STOW-RS request completed)."""
    studies = sorted(set(study_uids))
    if studies:
        await metadata.mark_boundary(studies, at or datetime.now(UTC))


class StudyAssembler:
    """Claims the studies whose burst has ended, publishes one ``study.ready`` per burst, acknowledges it.

    A claimed burst whose events the bus has not taken is kept in memory and published first on the
    next run; while any is, nothing new is claimed, so the store (not this process) holds the
    backlog of a bus outage. If this process dies meanwhile, the lease brings the burst back.
    """

    def __init__(
        self,
        metadata: MetadataStore,
        bus: MessageBus,
        audit: AuditTrail,
        quiet_period: timedelta,
        *,
        max_idle: timedelta,
        lease: timedelta,
    ) -> None:
        self._metadata = metadata
        self._bus = bus
        self._audit = audit
        self._quiet_period = quiet_period
        self._max_idle = max_idle
        self._lease = lease
        self._unpublished: list[tuple[ReadyStudy, list[Envelope]]] = []

    @property
    def pending(self) -> int:
        """Bursts claimed whose events the bus has not taken yet."""
        return len(self._unpublished)

    async def run_once(self, now: datetime | None = None) -> list[ReadyStudy]:
        """Publish what is pending, then claim, publish and acknowledge ended bursts; returns the
        bursts claimed."""
        if not await self._flush():
            return []
        claimed: list[ReadyStudy] = []
        while True:
            at = now or datetime.now(UTC)
            batch = await self._metadata.claim_ready(
                at, quiet=self._quiet_period, max_idle=self._max_idle, lease=self._lease, limit=CLAIM_BATCH
            )
            for ready in batch:
                instances = await self._metadata.list_instances(ready.study_uid)
                announcement = [
                    events.study_ready(ready, at, instances),
                    events.study_ready_audit(ready, at),
                ]
                self._unpublished.append((ready, announcement))
                log.info(
                    "study ready",
                    extra={
                        "study_uid": ready.study_uid,
                        "burst": ready.burst,
                        "instances": ready.burst_instances,
                    },
                )
            claimed += batch
            if not await self._flush() or len(batch) < CLAIM_BATCH:
                return claimed

    async def run(self, interval: float) -> None:
        """Assemble every ``interval`` seconds until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("study assembly failed; retrying")
            await asyncio.sleep(interval)

    async def _flush(self) -> bool:
        """Publish the claimed bursts' events concurrently; True when none is left."""
        if not self._unpublished:
            return True
        done = await asyncio.gather(*(self._announce(ready, left) for ready, left in self._unpublished))
        self._unpublished = [item for item, ok in zip(self._unpublished, done, strict=True) if not ok]
        return not self._unpublished

    async def _announce(self, ready: ReadyStudy, envelopes: list[Envelope]) -> bool:
        """Publish a burst's events, then acknowledge the burst. False when the bus refused one:
        ``envelopes`` keeps those left to publish."""
        results = await asyncio.gather(*(self._send(e) for e in envelopes), return_exceptions=True)
        left = []
        for envelope, result in zip(envelopes, results, strict=True):
            if isinstance(result, BaseException):
                metrics.EVENT_FAILURES.labels(envelope.routing_key).inc()
                log.warning("event %s not published yet: %r", envelope.message_id, result)
                left.append(envelope)
        envelopes[:] = left
        if left:
            return False
        metrics.STUDIES_READY.inc()
        try:
            await self._metadata.ack_ready(ready.study_uid, ready.burst)
        except Exception:  # its lease expires and it is published again, with the same message ids
            log.exception("could not acknowledge burst %d of study %s", ready.burst, ready.study_uid)
        return True

    async def _send(self, envelope: Envelope) -> None:
        """The audit record goes through the audit trail (bus or channel), ``study.ready`` on the bus."""
        if envelope.routing_key == AUDIT_RECORD:
            await self._audit.record(envelope)
        else:
            await self._bus.publish(envelope)
