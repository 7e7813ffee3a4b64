"""The events ingestion emits, with deterministic message ids so a re-publish is recognised downstream."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from lucerna.core.dicom.attributes import TAGS, first_value, person_name_text
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.events.topology import AUDIT_RECORD, STUDY_READY
from lucerna.core.storage.ports import DicomJson, InstanceRecord, ReadyStudy
from lucerna.events.v1 import events_pb2

SERVICE = "ingestion"
TIMEZONE_OFFSET_TAG = "00080201"  # TimezoneOffsetFromUTC, read for StudyReady only


def instance_stored(record: InstanceRecord, traceparent: str | None = None) -> Envelope:
    """The audit record of one newly stored instance (ids and hashes only, no PHI)."""
    message = events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.INSTANCE_STORED,
        service=SERVICE,
        at=record.received_at,
        actor=record.source,
        study_instance_uid=record.study_uid,
        series_instance_uid=record.series_uid,
        sop_instance_uid=record.sop_instance_uid,
        sha256=record.sha256,
        details={
            "sop_class_uid": record.sop_class_uid,
            "transfer_syntax_uid": record.transfer_syntax_uid,
            "size": str(record.size),
        },
    )
    return codec.encode(
        AUDIT_RECORD,
        message,
        correlation_id=record.study_uid,
        message_id=f"instance-stored:{record.sop_instance_uid}:{record.sha256}",
        timestamp=record.received_at,
        traceparent=traceparent,
    )


def study_ready(ready: ReadyStudy, at: datetime, instances: Sequence[InstanceRecord] = ()) -> Envelope:
    """``study.ready`` for one burst of a study, with what workflow rules match on and the study's
    instance set so far (``instances``: the study's stored instances)."""
    refs = [_instance_ref(record) for record in instances]
    datasets = [record.dataset for record in instances]
    message = events_pb2.StudyReady(
        study_instance_uid=ready.study_uid,
        burst=ready.burst,
        burst_instances=ready.burst_instances,
        total_instances=ready.total_instances,
        patient_id=ready.patient_id or "",
        modalities=list(ready.modalities),
        sources=list(ready.sources),
        ready_at=at,
        study_description=_study_text(datasets, "StudyDescription"),
        body_parts=sorted({ref.body_part for ref in refs if ref.body_part}),
        sop_class_uids=sorted({ref.sop_class_uid for ref in refs}),
        calling_ae_titles=sorted({ae for record in instances if (ae := calling_ae_title(record.source))}),
        instances=refs,
        patient_name=_study_text(datasets, "PatientName"),
        issuer_of_patient_id=_study_text(datasets, "IssuerOfPatientID"),
        accession_number=_study_text(datasets, "AccessionNumber"),
        study_date=_study_text(datasets, "StudyDate"),
        study_time=_study_text(datasets, "StudyTime"),
        timezone_offset=_study_text(datasets, TIMEZONE_OFFSET_TAG),
    )
    return codec.encode(
        STUDY_READY,
        message,
        correlation_id=ready.study_uid,
        message_id=f"study-ready:{ready.study_uid}:{ready.burst}",
        timestamp=at,
    )


def study_ready_audit(ready: ReadyStudy, at: datetime) -> Envelope:
    """The audit record of a study declared ready."""
    message = events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.STUDY_READY,
        service=SERVICE,
        at=at,
        actor=",".join(ready.sources),
        study_instance_uid=ready.study_uid,
        details={
            "burst": str(ready.burst),
            "burst_instances": str(ready.burst_instances),
            "total_instances": str(ready.total_instances),
        },
    )
    return codec.encode(
        AUDIT_RECORD,
        message,
        correlation_id=ready.study_uid,
        message_id=f"audit-study-ready:{ready.study_uid}:{ready.burst}",
        timestamp=at,
    )


def calling_ae_title(source: str) -> str | None:
    """The calling AE title of a ``dimse:<AE>@<host>`` source; None for STOW-RS."""
    if not source.startswith("dimse:"):
        return None
    return source.removeprefix("dimse:").rpartition("@")[0] or None


def _study_text(datasets: Sequence[DicomJson], keyword_or_tag: str) -> str:
    """A study-level attribute as text: the first instance that has it (a person name in its
    alphabetic form), "" when none does."""
    tag = TAGS[keyword_or_tag][0] if keyword_or_tag in TAGS else keyword_or_tag
    for dataset in datasets:
        values = (dataset.get(tag) or {}).get("Value")
        text = person_name_text(values[0]) if values else None
        if text and text.strip():
            return text.strip()
    return ""


def _instance_ref(record: InstanceRecord) -> events_pb2.InstanceRef:
    modality = first_value(record.dataset, "Modality")
    body_part = first_value(record.dataset, "BodyPartExamined")
    return events_pb2.InstanceRef(
        sop_instance_uid=record.sop_instance_uid,
        series_instance_uid=record.series_uid,
        sop_class_uid=record.sop_class_uid,
        sha256=record.sha256,
        modality=str(modality).strip().upper() if modality else "",
        body_part=str(body_part).strip().upper() if body_part else "",
        transfer_syntax_uid=record.transfer_syntax_uid,
    )
