"""A realistic study and result for the FHIR publishing tests."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from lucerna.events.v1 import events_pb2
from lucerna.fhir.publishing import PublishingSettings, StudyFacts

STUDY = "1.2.826.0.1.3680043.8.498.11"
SERIES = "1.2.826.0.1.3680043.8.498.11.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
WEIGHTS = "a" * 64
INSTANCE_SET = "b" * 64
COMPLETED_AT = datetime(2026, 11, 21, 9, 30, 5, tzinfo=UTC)


def sop(number: int) -> str:
    """The SOP Instance UID of slice ``number``."""
    return f"{SERIES}.{number}"


def study_ready(slices: int = 3) -> events_pb2.StudyReady:
    """A chest CT of ``slices`` instances, as ingestion announces it."""
    return events_pb2.StudyReady(
        study_instance_uid=STUDY,
        burst=1,
        burst_instances=slices,
        total_instances=slices,
        patient_id="MRN-0042",
        modalities=["CT"],
        study_description="CT CHEST W/O CONTRAST",
        body_parts=["CHEST"],
        sop_class_uids=[CT_IMAGE],
        instances=[
            events_pb2.InstanceRef(
                sop_instance_uid=sop(n),
                series_instance_uid=SERIES,
                sop_class_uid=CT_IMAGE,
                sha256=f"{n:064x}",
                modality="CT",
                body_part="CHEST",
            )
            for n in range(1, slices + 1)
        ],
    )


def study_facts() -> StudyFacts:
    """The facts of the chest CT."""
    return StudyFacts.from_study_ready(study_ready())


def nodule(
    probability: float, diameter_mm: float, slice_number: int, display: str = "Pulmonary nodule"
) -> events_pb2.Finding:
    """A pulmonary nodule finding on one slice."""
    return events_pb2.Finding(
        code_system="http://snomed.info/sct",
        code="786838002",
        display=display,
        probability=probability,
        locations=[
            events_pb2.ImageLocation(
                sop_instance_uid=sop(slice_number),
                frame=1,
                x_min=100.5,
                y_min=80.25,
                x_max=122.1,
                y_max=101.7,
            )
        ],
        measurements=[events_pb2.Measurement(name="diameter", value=diameter_mm, unit="mm")],
        body_site_code="39607008",
        body_site_display="Lung structure",
    )


def completed(*findings: events_pb2.Finding, job_id: str = "job-7f3a") -> events_pb2.InferenceCompleted:
    """The worker's result for the chest CT."""
    at = Timestamp()
    at.FromDatetime(COMPLETED_AT)
    return events_pb2.InferenceCompleted(
        job_id=job_id,
        attempt=1,
        study_instance_uid=STUDY,
        model="lung-nodule-detector",
        model_version="1.2.0",
        weights_sha256=WEIGHTS,
        instance_set_sha256=INSTANCE_SET,
        findings=list(findings),
        timings=events_pb2.Timings(total_ms=812.5),
        completed_at=at,
        result_id="result-19",
        patient_id="MRN-0042",
        sop_instance_uids=[sop(n) for n in (1, 2, 3)],
    )


def two_nodules() -> events_pb2.InferenceCompleted:
    """A result with two nodules."""
    return completed(nodule(0.93, 21.6, 2), nodule(0.71, 8.4, 3))


SETTINGS = PublishingSettings(dicomweb_base_url="http://127.0.0.1:8080/dicom-web")
