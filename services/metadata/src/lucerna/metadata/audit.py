"""Audit records of patient-data reads (IHE BALP style: who, what, when), published on ``audit.record``.

The audit log keeps no PHI in clear, so the values of patient-identifying query parameters are
replaced by a hash of them: an auditor who knows the value can still confirm what was searched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode

from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.events import codec
from lucerna.core.events.topology import AUDIT_RECORD
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


def redact(query: Sequence[tuple[str, str]]) -> str:
    """The query string with patient-identifying values replaced by ``sha256:<first 16 hex digits>``."""
    pairs = []
    for name, value in query:
        hidden = name.lower() in PHI_PARAMETERS and value
        pairs.append((name, "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16] if hidden else value))
    return urlencode(pairs)


def audit_record(read: PatientDataRead, at: datetime | None = None) -> AuditRecord:
    """The AuditRecord of a read."""
    timestamp = Timestamp()
    timestamp.FromDatetime(at or datetime.now(UTC))
    studies = list(dict.fromkeys(read.study_uids))
    details = {"route": read.route, "query": redact(read.query), "studies_returned": str(len(studies))}
    if read.request_id:
        details["request_id"] = read.request_id
    if len(studies) > 1:
        details["studies"] = ",".join(studies[:MAX_LISTED_STUDIES])
        if len(studies) > MAX_LISTED_STUDIES:
            details["studies_truncated"] = "true"
    details.update(read.extra)
    return AuditRecord(
        action=AuditRecord.PATIENT_DATA_READ,
        service=SERVICE,
        at=timestamp,
        actor=read.actor,
        study_instance_uid=studies[0] if len(studies) == 1 else "",
        series_instance_uid=read.series_uid,
        sop_instance_uid=read.sop_instance_uid,
        details=details,
    )


async def publish_read(trail: AuditTrail, read: PatientDataRead) -> None:
    """Publish the audit record of a read, retrying briefly; a record that still cannot be published
    is logged with its content (the answer has been sent, so raising would help nobody)."""
    record = audit_record(read)
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
                log.error(  # noqa: TRY400 - the record itself is what the log must keep
                    "lost the audit record of a patient-data read: %s",
                    error,
                    extra={"audit_record": MessageToDict(record), "attempts": attempt + 1},
                )
                return
            await asyncio.sleep(delay)
        else:
            return
