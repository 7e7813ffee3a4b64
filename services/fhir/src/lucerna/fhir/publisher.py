"""Publishing: ``study.ready`` keeps the study's Patient and ImagingStudy current, and
``inference.completed`` becomes one stored transaction, announced by ``ReportPublished`` and an
audit record.

Both handlers are idempotent. Resources have deterministic ids and a write of unchanged content
makes no new version, so a redelivered event stores nothing new and announces the same thing
under the same message ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.resource import Resource
from lucerna.core.audit_trail import AuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope, MessageBus, PermanentError
from lucerna.events.v1 import events_pb2
from lucerna.fhir import events
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.deliveries import PUSH, Delivery, DeliveryOutbox
from lucerna.fhir.publishing import (
    PublishingError,
    PublishingSettings,
    StudyFacts,
    imaging_resources,
    publication,
    resource_json,
)
from lucerna.fhir.repository import Repository
from lucerna.fhir.store import ResourceWrite, WriteOutcome
from lucerna.fhir.studies import StudyStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Push:
    """Where results are pushed: the hospital FHIR server's base URL, through the outbox."""

    url: str
    outbox: DeliveryOutbox
    wake: Callable[[], None] = lambda: None

    def delivery(self, job_id: str, bundle: Bundle, at: datetime) -> Delivery:
        """The transaction of one result, POSTed to the server's base."""
        body = json.dumps(resource_json(bundle), separators=(",", ":"), ensure_ascii=False).encode()
        return Delivery(
            key=f"push:{job_id}", kind=PUSH, url=self.url, body=body, created_at=at, next_attempt_at=at
        )


class StudyNotKnownError(Exception):
    """A result arrived before its study's ``study.ready`` (retried: the other queue catches up)."""


class Publisher:
    """The event handlers of the FHIR service."""

    def __init__(
        self,
        repository: Repository,
        studies: StudyStore,
        bus: MessageBus,
        audit: AuditTrail,
        settings: PublishingSettings,
        *,
        push: Push | None = None,
        site_timezone: tzinfo = UTC,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.repository = repository
        self.studies = studies
        self.bus = bus
        self.audit = audit
        self.settings = settings
        self.push = push
        self.site_timezone = site_timezone
        self.clock = clock

    async def on_study_ready(self, envelope: Envelope) -> None:
        """Keep the study's facts; write its Patient, ImagingStudy and Endpoint (a new version of
        the ImagingStudy when the burst added instances)."""
        ready = codec.decode(envelope, events_pb2.StudyReady)
        if not await self.studies.put(ready):
            return  # a later burst is kept already; its resources are the current ones
        if not ready.patient_id:
            # No patient to file it under; the result of such a study is refused the same way.
            log.warning("study %s has no PatientID; no ImagingStudy is published", ready.study_instance_uid)
            return
        facts = self._facts(ready)
        try:
            resources = imaging_resources(facts, self.settings)
        except PublishingError as error:
            raise PermanentError(str(error)) from error
        await self.repository.write([_write(resource) for resource in resources])

    async def on_inference_completed(self, envelope: Envelope) -> None:
        """Publish the result as one transaction, then announce it."""
        completed = codec.decode(envelope, events_pb2.InferenceCompleted)
        ready = await self.studies.get(completed.study_instance_uid)
        if ready is None:
            raise StudyNotKnownError(f"study {completed.study_instance_uid} has no study.ready yet")
        try:
            published = publication(completed, self._facts(ready), self.settings)
        except PublishingError as error:
            raise PermanentError(str(error)) from error
        outcomes = await self.repository.write([_write(entry.resource) for entry in published.entries])
        stored = [outcome.stored for outcome in outcomes]
        report = next(item for item in stored if item.resource_type == "DiagnosticReport")
        at = self.clock()
        if self.push is not None:
            # Added again on a redelivery: the outbox keeps one per job, pushed or not.
            await self.push.outbox.add([self.push.delivery(completed.job_id, published.bundle, at)])
            self.push.wake()
        await self.bus.publish(events.report_published(completed, report.reference, stored, at))
        await self.audit.record(events.result_published_audit(completed, report, stored, at))
        log.info(
            "result published",
            extra={
                "job_id": completed.job_id,
                "report": report.reference,
                "new_versions": _changed(outcomes),
            },
        )

    def _facts(self, ready: events_pb2.StudyReady) -> StudyFacts:
        return StudyFacts.from_study_ready(ready, self.site_timezone)


def _write(resource: Resource) -> ResourceWrite:
    data = resource_json(resource)
    return ResourceWrite(data["resourceType"], data["id"], data, canonical_sha256(resource))


def _changed(outcomes: Sequence[WriteOutcome]) -> list[str]:
    return [outcome.stored.reference for outcome in outcomes if outcome.changed]
