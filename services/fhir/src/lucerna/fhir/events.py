"""The events the FHIR service emits, with deterministic message ids (one per job), so a
re-publication after a redelivery is recognised downstream."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.events.topology import AUDIT_RECORD, REPORT_PUBLISHED
from lucerna.events.v1 import events_pb2
from lucerna.fhir.store import StoredResource

SERVICE = "fhir"


def report_published(
    completed: events_pb2.InferenceCompleted,
    report: str,
    stored: Sequence[StoredResource],
    at: datetime,
) -> Envelope:
    """``fhir.report-published``: the result's resources are stored and searchable."""
    message = events_pb2.ReportPublished(
        job_id=completed.job_id,
        study_instance_uid=completed.study_instance_uid,
        diagnostic_report=report,
        resources=[
            events_pb2.PublishedResource(
                reference=item.reference, version_id=item.version_id, sha256=item.sha256
            )
            for item in stored
        ],
        published_at=at,
        model=completed.model,
        model_version=completed.model_version,
    )
    return codec.encode(
        REPORT_PUBLISHED,
        message,
        correlation_id=completed.job_id,
        message_id=f"report-published:{completed.job_id}",
        timestamp=at,
    )


def result_published_audit(
    completed: events_pb2.InferenceCompleted,
    report: StoredResource,
    stored: Sequence[StoredResource],
    at: datetime,
) -> Envelope:
    """The audit record of a publication: the report's canonical SHA-256, and every resource's
    reference with its version and hash (ids and hashes only, no PHI)."""
    details = {item.reference: f"{item.version_id}:{item.sha256}" for item in stored}
    details |= {"job_id": completed.job_id, "model": f"{completed.model}:{completed.model_version}"}
    message = events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.RESULT_PUBLISHED,
        service=SERVICE,
        at=at,
        actor=SERVICE,
        study_instance_uid=completed.study_instance_uid,
        sha256=report.sha256,
        details=details,
    )
    return codec.encode(
        AUDIT_RECORD,
        message,
        correlation_id=completed.job_id,
        message_id=f"audit-result-published:{completed.job_id}",
        timestamp=at,
    )
