"""Audit records of FHIR reads (IHE BALP style), published on ``audit.record`` off the request path.

Every read, vread, history and search of a type that holds patient data becomes, once answered,
one ``PATIENT_DATA_READ`` record per patient whose data the answer disclosed (BALP: one AuditEvent
per patient), naming the resources disclosed; an answer that disclosed no patient's data (a failed
read, an empty search, resources of no patient) still becomes one record, without a patient. The
patient reference and the query as received are PHI: they travel in the record's PHI fields, which
the audit service seals at rest.

The request only queues what it answered (``ReadAuditor.note``); a worker parses the answers and
publishes the records, each retried briefly. A record that cannot be published is logged without
its PHI and never fails the read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.events import codec
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.events.v1.events_pb2 import AuditRecord

log = logging.getLogger(__name__)

SERVICE = "fhir"
# Types whose resources are about one patient (or lead to one: a Provenance of a patient's report).
PATIENT_DATA_TYPES = frozenset({"Patient", "ImagingStudy", "DiagnosticReport", "Observation", "Provenance"})
PUBLISH_RETRY_DELAYS = (0.1, 0.5, 2.0)
BATCH_SECONDS = 0.005  # a busy API's reads are published in batches, not woken for one by one
MAX_PENDING = 10_000  # answers waiting for the worker; past it, reads are logged as unaudited
MAX_ENTITIES = 1000  # resources named per record; more are cut, with details["entities_truncated"]


@dataclass(frozen=True)
class FhirRead:
    """One answered read-type request, as the worker needs it."""

    actor: str
    interaction: str  # FHIR restful-interaction: read, vread, history-instance, history-type, search-type
    resource_type: str
    reference: str  # "<Type>/<id>" for instance interactions, else ""
    query: str  # the path and query string as received (and a _search form body)
    status: int
    body: bytes | None
    at: datetime
    request_id: str = ""
    traceparent: str | None = None


def audit_records(read: FhirRead) -> list[AuditRecord]:
    """The records of one answer: one per patient disclosed, or one without a patient."""
    groups = _disclosed(read)
    timestamp = Timestamp()
    timestamp.FromDatetime(read.at)
    outcome = 0 if read.status < 400 else 4 if read.status < 500 else 8
    records = []
    for patient, references in groups.items():
        details = {"request_id": read.request_id} if read.request_id else {}
        if len(references) > MAX_ENTITIES:
            details["entities_truncated"] = "true"
        records.append(
            AuditRecord(
                action=AuditRecord.PATIENT_DATA_READ,
                service=SERVICE,
                at=timestamp,
                actor=read.actor,
                patient=patient,
                query=read.query,
                outcome=outcome,
                subtype=read.interaction,
                entities=references[:MAX_ENTITIES],
                details=details,
            )
        )
    return records


def _disclosed(read: FhirRead) -> dict[str, list[str]]:
    """Patient reference ("" for none) -> the other resources disclosed of that patient."""
    resources: list[dict[str, Any]] = []
    if read.status < 300 and read.body:
        answer = json.loads(read.body)
        if answer.get("resourceType") == "Bundle":
            entries = answer.get("entry", ())
            resources = [entry["resource"] for entry in entries if _is_resource(entry.get("resource"))]
        else:
            resources = [answer]
    groups: dict[str, list[str]] = {}
    for resource in resources:
        reference = f"{resource['resourceType']}/{resource.get('id', '')}"
        patient = _patient_of(resource)
        references = groups.setdefault(patient, [])
        if reference != patient and reference not in references:
            references.append(reference)
    if not groups:  # nothing disclosed (an error, a 304, an empty page): what was asked for
        patient = read.reference if read.reference.startswith("Patient/") else ""
        groups[patient] = [read.reference] if read.reference and read.reference != patient else []
    return groups


def _is_resource(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") not in (None, "OperationOutcome")


def _patient_of(resource: dict[str, Any]) -> str:
    if resource["resourceType"] == "Patient":
        return f"Patient/{resource.get('id', '')}"
    for element in ("subject", "patient"):
        reference = (resource.get(element) or {}).get("reference", "")
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return reference
    return ""


class ReadAuditor:
    """Queues answered reads and publishes their records from a worker (``run``)."""

    def __init__(self, trail: AuditTrail, max_pending: int = MAX_PENDING) -> None:
        self._trail = trail
        self._pending: asyncio.Queue[FhirRead] = asyncio.Queue(max_pending)
        self._wake = asyncio.Event()

    def note(self, read: FhirRead) -> None:
        """Queue an answered read (never blocks, never raises)."""
        try:
            self._pending.put_nowait(read)
            self._wake.set()
        except asyncio.QueueFull:
            log.error(  # noqa: TRY400 - no traceback to give; no PHI: who, which interaction on which type
                "the FHIR read audit queue is full: a read is not audited",
                extra={"actor": read.actor, "interaction": read.interaction, "type": read.resource_type},
            )

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish queued reads until ``stopping`` is set and the queue is empty."""
        while not (stopping.is_set() and self._pending.empty()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)  # and looks at stopping at least that often
            await asyncio.sleep(BATCH_SECONDS)  # the reads answered meanwhile join this batch
            self._wake.clear()
            await self.publish_pending()

    async def publish_pending(self) -> None:
        """Publish the records of every read queued now (concurrently, each retried)."""
        publishing = []
        while not self._pending.empty():
            read = self._pending.get_nowait()
            try:
                records = audit_records(read)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                log.error("cannot audit a FHIR read: its answer did not parse (%s)", type(error).__name__)  # noqa: TRY400 - no PHI in the log
                continue
            publishing += [_publish(self._trail, record, read) for record in records]
        await asyncio.gather(*publishing)


async def _publish(trail: AuditTrail, record: AuditRecord, read: FhirRead) -> None:
    envelope = codec.encode(
        AUDIT_RECORD, record, correlation_id=read.request_id or SERVICE, traceparent=read.traceparent
    )
    for attempt, delay in enumerate((*PUBLISH_RETRY_DELAYS, None)):
        try:
            await trail.record(envelope)
        except Exception as error:  # noqa: BLE001 - any trail failure is retried, then logged
            if delay is None:
                log.error(  # noqa: TRY400 - who and what, without the PHI fields
                    "lost the audit record of a FHIR read: %s",
                    error,
                    extra={
                        "actor": read.actor,
                        "interaction": read.interaction,
                        "entities": list(record.entities),
                        "request_id": read.request_id,
                        "attempts": attempt + 1,
                    },
                )
                return
            await asyncio.sleep(delay)
        else:
            return
