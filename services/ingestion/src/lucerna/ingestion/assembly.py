"""Study assembly: when has a study's burst of instances arrived completely?

A burst ends at a boundary (a DIMSE association ended, a STOW-RS request completed) followed by a
quiet period with no new instance of the study. The metadata store keeps that state and hands
each ended burst out exactly once (``claim_ready``); this module turns each into one
``study.ready`` event and its audit record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from lucerna.core.events.ports import Envelope, MessageBus
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
    """Claims the studies whose burst has ended and publishes one ``study.ready`` per burst.

    A claimed burst's events are kept in memory until the bus takes them; while any are pending,
    nothing new is claimed, so the store (not this process) holds the backlog of a bus outage.
    """

    def __init__(self, metadata: MetadataStore, bus: MessageBus, quiet_period: timedelta) -> None:
        self._metadata = metadata
        self._bus = bus
        self._quiet_period = quiet_period
        self._pending: list[Envelope] = []

    @property
    def pending(self) -> int:
        """Events claimed but not yet taken by the bus."""
        return len(self._pending)

    async def run_once(self, now: datetime | None = None) -> list[ReadyStudy]:
        """Publish what is pending, then claim and publish ended bursts; returns the studies claimed."""
        if not await self._flush():
            return []
        claimed: list[ReadyStudy] = []
        while True:
            at = now or datetime.now(UTC)
            batch = await self._metadata.claim_ready(at - self._quiet_period, limit=CLAIM_BATCH)
            for ready in batch:
                self._pending += [events.study_ready(ready, at), events.study_ready_audit(ready, at)]
                log.info(
                    "study ready",
                    extra={
                        "study_uid": ready.study_uid,
                        "burst": ready.burst,
                        "instances": ready.burst_instances,
                    },
                )
            claimed += batch
            metrics.STUDIES_READY.inc(len(batch))
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
        """Publish the pending events concurrently; True when none is left."""
        if not self._pending:
            return True
        results = await asyncio.gather(*(self._bus.publish(e) for e in self._pending), return_exceptions=True)
        left = []
        for envelope, result in zip(self._pending, results, strict=True):
            if isinstance(result, BaseException):
                metrics.EVENT_FAILURES.labels(envelope.routing_key).inc()
                log.warning("event %s not published yet: %r", envelope.message_id, result)
                left.append(envelope)
        self._pending = left
        return not left
