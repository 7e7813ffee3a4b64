"""Audit records of patient-data reads (IHE BALP style: who, what, when, whose), published on
``audit.record``.

One record per patient whose studies an answer disclosed (BALP: one AuditEvent per patient), naming
that patient in the record's PHI field ``dicom_patient`` (PatientID and Issuer of Patient ID, sealed
at rest by the audit service, which indexes it as the FHIR Patient); studies without a PatientID go
into one record without a patient. The patient comes from what the read already holds where it can
(WADO-RS: the instance records it served), else from one read of the study rows after the answer
has been sent (QIDO-RS: ``MetadataStore.study_patients``).

The audit log keeps no PHI in clear, so the values of patient-identifying query parameters are
replaced by a hash of them: an auditor who knows the value can still confirm what was searched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode

from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.events import codec
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.core.storage.ports import MetadataStore, StudyPatient
from lucerna.events.v1.events_pb2 import AuditRecord

log = logging.getLogger(__name__)

SERVICE = "metadata"
_PHI_KEYWORDS = (
    ("PatientName", "00100010"),
    ("PatientID", "00100020"),
    ("IssuerOfPatientID", "00100021"),
    ("PatientBirthDate", "00100030"),
    ("PatientSex", "00100040"),
    ("AccessionNumber", "00080050"),
    ("ReferringPhysicianName", "00080090"),
    ("StudyID", "00200010"),
)
PHI_PARAMETERS = frozenset(name.lower() for pair in _PHI_KEYWORDS for name in pair) | {"q"}
MAX_LISTED_STUDIES = 100
PUBLISH_RETRY_DELAYS = (0.1, 0.5, 2.0)


@dataclass(frozen=True)
class PatientDataRead:
    """One answered request that disclosed patient data."""

    actor: str
    route: str  # the route template, e.g. /dicom-web/studies/{study}/metadata
    query: Sequence[tuple[str, str]]
    study_uids: Sequence[str] = ()
    series_uid: str = ""
    sop_instance_uid: str = ""
    request_id: str = ""
    traceparent: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # Study UID -> its patient, where the answer already knew it (the others are looked up).
    patients: Mapping[str, StudyPatient] = field(default_factory=dict)


def redact(query: Sequence[tuple[str, str]]) -> str:
    """The query string with patient-identifying values replaced by ``sha256:<first 16 hex digits>``."""
    pairs = []
    for name, value in query:
        hidden = name.lower() in PHI_PARAMETERS and value
        pairs.append((name, "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16] if hidden else value))
    return urlencode(pairs)


def audit_records(
    read: PatientDataRead, patients: Mapping[str, StudyPatient] | None = None, at: datetime | None = None
) -> list[AuditRecord]:
    """The AuditRecords of a read: one per patient of the studies disclosed (``patients``, by study
    UID; default ``read.patients``), one without a patient for studies of none or unknown."""
    known = read.patients if patients is None else patients
    timestamp = Timestamp()
    timestamp.FromDatetime(at or datetime.now(UTC))
    groups: dict[tuple[str, str], list[str]] = {}
    for uid in dict.fromkeys(read.study_uids):
        patient = known.get(uid)
        key = (
            (patient.patient_id, patient.issuer_of_patient_id) if patient and patient.patient_id else ("", "")
        )
        groups.setdefault(key, []).append(uid)
    return [
        _record(read, studies, patient, timestamp) for patient, studies in (groups or {("", ""): []}).items()
    ]


def _record(
    read: PatientDataRead, studies: list[str], patient: tuple[str, str], timestamp: Timestamp
) -> AuditRecord:
    details = {"route": read.route, "query": redact(read.query), "studies_returned": str(len(studies))}
    if read.request_id:
        details["request_id"] = read.request_id
    if len(studies) > 1:
        details["studies"] = ",".join(studies[:MAX_LISTED_STUDIES])
        if len(studies) > MAX_LISTED_STUDIES:
            details["studies_truncated"] = "true"
    details.update(read.extra)
    patient_id, issuer = patient
    return AuditRecord(
        action=AuditRecord.PATIENT_DATA_READ,
        service=SERVICE,
        at=timestamp,
        actor=read.actor,
        study_instance_uid=studies[0] if len(studies) == 1 else "",
        series_instance_uid=read.series_uid,
        sop_instance_uid=read.sop_instance_uid,
        details=details,
        dicom_patient=(
            AuditRecord.DicomPatient(patient_id=patient_id, issuer_of_patient_id=issuer)
            if patient_id
            else None
        ),
    )


async def publish_read(
    trail: AuditTrail, read: PatientDataRead, metadata: MetadataStore | None = None
) -> None:
    """Publish the audit records of a read, retrying briefly; a record that still cannot be published
    is logged with its content but not its PHI (the answer has been sent, so raising would help
    nobody). The patients of studies the read did not know are read from ``metadata`` first."""
    patients = dict(read.patients)
    unknown = [uid for uid in dict.fromkeys(read.study_uids) if uid not in patients]
    if unknown and metadata is not None:
        try:
            patients.update(await metadata.study_patients(unknown))
        except Exception as error:  # noqa: BLE001 - the read is still audited, without its patient
            log.warning(  # no PHI: how many studies, and why
                "cannot find the patients of %d studies read: their audit record names none (%s)",
                len(unknown),
                error,
            )
    for record in audit_records(read, patients):
        await _publish(trail, record, read)


async def _publish(trail: AuditTrail, record: AuditRecord, read: PatientDataRead) -> None:
    envelope = codec.encode(
        AUDIT_RECORD,
        record,
        correlation_id=record.study_instance_uid or read.request_id or SERVICE,
        traceparent=read.traceparent,
    )
    for attempt, delay in enumerate((*PUBLISH_RETRY_DELAYS, None)):
        try:
            await trail.record(envelope)
        except Exception as error:  # noqa: BLE001 - any trail failure is retried, then logged
            if delay is None:
                logged = AuditRecord()
                logged.CopyFrom(record)
                logged.ClearField("dicom_patient")  # PHI never goes to the log
                log.error(  # noqa: TRY400 - the record itself is what the log must keep
                    "lost the audit record of a patient-data read: %s",
                    error,
                    extra={"audit_record": MessageToDict(logged), "attempts": attempt + 1},
                )
                return
            await asyncio.sleep(delay)
        else:
            return
