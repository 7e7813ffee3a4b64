"""Audit records of FHIR reads (IHE BALP style), published on ``audit.record`` off the request path.

Every read, vread, history and search of a type that holds patient data becomes, once answered,
one ``PATIENT_DATA_READ`` record per patient whose data the answer disclosed (BALP: one AuditEvent
per patient), naming the resources disclosed; an answer that disclosed no patient's data (a failed
read, an empty search, resources of no patient) still becomes one record, without a patient. The
patient reference and the query as received are PHI: they travel in the record's PHI fields, which
the audit service seals at rest.

The request only queues what it answered, as the stored resources the API already holds
(``ReadAuditor.note``: a few hundred nanoseconds), never the response to parse again; a worker finds
each resource's patient (remembered per resource version, so a resource read again is not parsed
again), builds the records and publishes a batch at a time, each record retried briefly. A record
that cannot be published is logged without its PHI and never fails the read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.fhir.store import StoredResource

log = logging.getLogger(__name__)

SERVICE = "fhir"
# Types whose resources are about one patient (or lead to one: a Provenance of a patient's report).
PATIENT_DATA_TYPES = frozenset({"Patient", "ImagingStudy", "DiagnosticReport", "Observation", "Provenance"})
PUBLISH_RETRY_DELAYS = (0.1, 0.5, 2.0)
BATCH_SECONDS = 0.02  # a busy API's reads are published in batches, not woken for one by one
MAX_PENDING = 10_000  # answers waiting for the worker; past it, reads are logged as unaudited
MAX_ENTITIES = 1000  # resources named per record; more are cut, with details["entities_truncated"]
REMEMBERED_PATIENTS = 50_000  # resource versions whose patient is remembered (about 100 bytes each)
PUBLISHING_LANES = 16  # records of a batch in flight at once (a broker's confirms take a round trip)
RECORDS_PER_LANE = 8  # a lane is a task: not one per record (an in-process bus never waits)


@dataclass(frozen=True, slots=True)
class FhirRead:
    """One answered read-type request, as the worker needs it."""

    actor: str
    interaction: str  # FHIR restful-interaction: read, vread, history-instance, history-type, search-type
    resource_type: str
    reference: str  # "<Type>/<id>" for instance interactions, else ""
    query: str  # the path and query string as received (and a _search form body)
    status: int
    disclosed: Sequence[StoredResource]  # the versions the answer carried (none unless status < 300)
    at: float  # when it was answered, POSIX seconds
    request_id: str = ""
    traceparent: str | None = None


def patient_of(stored: StoredResource) -> str:
    """The reference of the patient a stored resource is about ("" for none): itself for a Patient,
    else its ``subject`` or ``patient`` when that refers to a Patient."""
    if stored.resource_type == "Patient":
        return f"Patient/{stored.id}"
    if stored.body is None:
        return ""
    resource: dict[str, Any] = json.loads(stored.body)
    for element in ("subject", "patient"):
        value = resource.get(element)
        reference = value.get("reference", "") if isinstance(value, dict) else ""
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return reference
    return ""


class RememberedPatients:
    """``patient_of`` for the worker, remembered per resource version (a version never changes), the
    oldest forgotten first past ``size``: the resources read again are the ones worth not parsing."""

    def __init__(self, size: int = REMEMBERED_PATIENTS) -> None:
        self._size = size
        self._known: dict[tuple[str, str, int], str] = {}

    def __call__(self, stored: StoredResource) -> str:
        if stored.resource_type == "Patient":
            return f"Patient/{stored.id}"
        key = (stored.resource_type, stored.id, stored.version_id)
        patient = self._known.get(key)
        if patient is None:
            patient = patient_of(stored)
            if len(self._known) >= self._size:
                del self._known[next(iter(self._known))]
            self._known[key] = patient
        return patient


def audit_records(read: FhirRead, patient: Callable[[StoredResource], str] = patient_of) -> list[AuditRecord]:
    """The records of one answer: one per patient disclosed, or one without a patient."""
    groups = _disclosed(read, patient)
    seconds = int(read.at)
    timestamp = Timestamp(seconds=seconds, nanos=int((read.at - seconds) * 1e9))
    outcome = 0 if read.status < 400 else 4 if read.status < 500 else 8
    records = []
    for reference, references in groups.items():
        details = {"request_id": read.request_id} if read.request_id else {}
        if len(references) > MAX_ENTITIES:
            details["entities_truncated"] = "true"
        records.append(
            AuditRecord(
                action=AuditRecord.PATIENT_DATA_READ,
                service=SERVICE,
                at=timestamp,
                actor=read.actor,
                patient=reference,
                query=read.query,
                outcome=outcome,
                subtype=read.interaction,
                entities=list(references)[:MAX_ENTITIES],
                details=details,
            )
        )
    return records


def _disclosed(read: FhirRead, patient_of: Callable[[StoredResource], str]) -> dict[str, dict[str, None]]:
    """Patient reference ("" for none) -> the other resources disclosed of that patient (in order)."""
    groups: dict[str, dict[str, None]] = {}
    if read.status < 300:
        for stored in read.disclosed:
            if stored.body is None:  # a deletion in a history: no data disclosed
                continue
            reference = f"{stored.resource_type}/{stored.id}"
            patient = patient_of(stored)
            references = groups.setdefault(patient, {})
            if reference != patient:
                references[reference] = None
    if not groups:  # nothing disclosed (an error, a 304, an empty page): what was asked for
        patient = read.reference if read.reference.startswith("Patient/") else ""
        groups[patient] = {read.reference: None} if read.reference and read.reference != patient else {}
    return groups


class ReadAuditor:
    """Queues answered reads and publishes their records from a worker (``run``)."""

    def __init__(self, trail: AuditTrail, max_pending: int = MAX_PENDING) -> None:
        self._trail = trail
        self._pending: asyncio.Queue[FhirRead] = asyncio.Queue(max_pending)
        self._wake = asyncio.Event()
        self._patients = RememberedPatients()
        self._publishing = False

    def note(self, read: FhirRead) -> None:
        """Queue an answered read (never blocks, never raises)."""
        try:
            self._pending.put_nowait(read)
        except asyncio.QueueFull:
            log.error(  # noqa: TRY400 - no traceback to give; no PHI: who, which interaction on which type
                "the FHIR read audit queue is full: a read is not audited",
                extra={"actor": read.actor, "interaction": read.interaction, "type": read.resource_type},
            )
        else:
            if not self._wake.is_set():
                self._wake.set()

    def idle(self) -> bool:
        """Whether every read noted so far has been published (or given up on)."""
        return self._pending.empty() and not self._publishing

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish queued reads until ``stopping`` is set and the queue is empty."""
        while not (stopping.is_set() and self._pending.empty()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):  # and looks at stopping at least that often
                    await self._wake.wait()
            self._wake.clear()
            if self._pending.empty():
                continue
            await asyncio.sleep(BATCH_SECONDS)  # the reads answered meanwhile join this batch
            await self.publish_pending()

    async def publish_pending(self) -> None:
        """Publish the records of every read queued now, in a few lanes at once, each record retried."""
        self._publishing = True
        try:
            batch: list[tuple[Envelope, AuditRecord, FhirRead]] = []
            while not self._pending.empty():
                read = self._pending.get_nowait()
                try:
                    records = audit_records(read, self._patients)
                except (ValueError, KeyError, TypeError, AttributeError) as error:
                    log.error("cannot audit a FHIR read: a resource did not parse (%s)", type(error).__name__)  # noqa: TRY400 - no PHI in the log
                    continue
                batch += [(_envelope(record, read), record, read) for record in records]
            lanes = min(PUBLISHING_LANES, -(-len(batch) // RECORDS_PER_LANE))
            if lanes <= 1:
                await _publish(self._trail, batch)
            else:
                await asyncio.gather(*(_publish(self._trail, batch[lane::lanes]) for lane in range(lanes)))
        finally:
            self._publishing = False


def _envelope(record: AuditRecord, read: FhirRead) -> Envelope:
    return codec.encode(
        AUDIT_RECORD, record, correlation_id=read.request_id or SERVICE, traceparent=read.traceparent
    )


async def _publish(trail: AuditTrail, lane: list[tuple[Envelope, AuditRecord, FhirRead]]) -> None:
    """Publish a lane's records one after the other (an in-process bus never waits, so one lane
    costs no task), each retried after short delays, then logged without its PHI."""
    for envelope, record, read in lane:
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
                    break
                await asyncio.sleep(delay)
            else:
                break
