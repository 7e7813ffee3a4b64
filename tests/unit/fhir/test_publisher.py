"""The publisher: study.ready keeps Patient and ImagingStudy current, inference.completed becomes
one stored transaction with its announcements, and redeliveries change nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope, PermanentError
from lucerna.core.events.topology import AUDIT_RECORD, INFERENCE_COMPLETED, REPORT_PUBLISHED, STUDY_READY
from lucerna.events.v1 import events_pb2
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.deliveries import SqliteDeliveryOutbox
from lucerna.fhir.publisher import Publisher, Push, StudyNotKnownError
from lucerna.fhir.publishing import resource_id
from lucerna.fhir.repository import Repository
from lucerna.fhir.search import parse_search
from lucerna.fhir.service import FhirService
from lucerna.fhir.sqlite_store import SqliteResources
from lucerna.fhir.studies import SqliteStudyStore
from tests.unit.fhir.kit import SETTINGS, STUDY, study_ready, two_nodules
from tests.unit.metadata.dicomweb_testkit import make_resources

pytestmark = pytest.mark.unit

PUBLISHED_AT = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


class RecordingBus:
    """The bus port, keeping what is published."""

    def __init__(self) -> None:
        self.published: list[Envelope] = []

    async def publish(self, envelope: Envelope) -> None:
        self.published.append(envelope)


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        self.resources = SqliteResources(tmp_path / "fhir.sqlite")
        self.studies = SqliteStudyStore(tmp_path / "studies.sqlite")
        self.outbox = SqliteDeliveryOutbox(tmp_path / "deliveries.sqlite")
        self.bus = RecordingBus()
        self.repository = Repository(self.resources, self.resources)
        self.publisher = Publisher(
            self.repository,
            self.studies,
            self.bus,  # type: ignore[arg-type] - publish is all the publisher uses
            BusAuditTrail(self.bus),  # type: ignore[arg-type]
            SETTINGS,
            push=Push("http://hospital.example/fhir", self.outbox),
            clock=lambda: PUBLISHED_AT,
        )

    async def version(self, resource_type: str, id: str) -> int:
        stored = await self.resources.read(resource_type, id)
        assert stored is not None, f"{resource_type}/{id} not stored"
        return stored.version_id


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    made = Stack(tmp_path)
    for part in (made.resources, made.studies, made.outbox):
        await part.start()
    yield made
    for part in (made.resources, made.studies, made.outbox):
        await part.close()


def ready(slices: int, burst: int) -> Envelope:
    event = study_ready(slices)
    event.burst = burst
    return codec.encode(STUDY_READY, event, correlation_id=STUDY, message_id=f"study-ready:{STUDY}:{burst}")


def completed() -> Envelope:
    event = two_nodules()
    return codec.encode(
        INFERENCE_COMPLETED, event, correlation_id=event.job_id, message_id=f"ic:{event.job_id}"
    )


async def test_a_study_gets_its_patient_and_imaging_study_and_a_new_burst_a_new_version(stack: Stack) -> None:
    study_id = resource_id("ImagingStudy", STUDY)
    await stack.publisher.on_study_ready(ready(3, burst=1))
    assert await stack.version("ImagingStudy", study_id) == 1
    await stack.publisher.on_study_ready(ready(5, burst=2))
    assert await stack.version("ImagingStudy", study_id) == 2
    await stack.publisher.on_study_ready(ready(3, burst=1))  # late redelivery of the first burst
    assert await stack.version("ImagingStudy", study_id) == 2
    stored = await stack.resources.read("ImagingStudy", study_id)
    assert stored is not None and json.loads(stored.body or b"{}")["numberOfInstances"] == 5
    [patient] = (
        await stack.resources.search(parse_search("Patient", [("identifier", "MRN-0042")]).query)
    ).resources
    assert patient.version_id == 1


async def test_a_result_before_its_study_is_retried_not_dead_lettered(stack: Stack) -> None:
    with pytest.raises(StudyNotKnownError):
        await stack.publisher.on_inference_completed(completed())


async def test_a_result_is_stored_announced_and_pushed_once_however_often_it_arrives(stack: Stack) -> None:
    await stack.publisher.on_study_ready(ready(3, burst=1))
    await stack.publisher.on_inference_completed(completed())
    job_id = two_nodules().job_id
    report_id = resource_id("DiagnosticReport", job_id)
    report = await stack.resources.read("DiagnosticReport", report_id)
    assert report is not None and report.version_id == 1
    body = json.loads(report.body or b"{}")
    assert canonical_sha256(body) == report.sha256
    assert len(body["result"]) == 2

    [announced, audit] = stack.bus.published
    assert (announced.routing_key, announced.message_id) == (REPORT_PUBLISHED, f"report-published:{job_id}")
    message = codec.decode(announced, events_pb2.ReportPublished)
    assert message.diagnostic_report == f"DiagnosticReport/{report_id}"
    kinds = [r.reference.split("/")[0] for r in message.resources]
    assert kinds == ["Endpoint", "Patient", "ImagingStudy", "Device", "Device", "Observation", "Observation",
                     "DiagnosticReport", "Provenance"]  # fmt: skip
    for published in message.resources:
        stored = await stack.resources.read(*published.reference.split("/"))
        assert stored is not None
        assert (published.version_id, published.sha256) == (stored.version_id, stored.sha256)
    assert audit.routing_key == AUDIT_RECORD
    record = codec.decode(audit, events_pb2.AuditRecord)
    assert record.action == events_pb2.AuditRecord.RESULT_PUBLISHED
    assert record.sha256 == report.sha256
    assert record.details[f"DiagnosticReport/{report_id}"] == f"1:{report.sha256}"

    await stack.publisher.on_inference_completed(completed())  # redelivered
    for published in message.resources:
        assert await stack.version(*published.reference.split("/")) == published.version_id
    assert [e.message_id for e in stack.bus.published[2:]] == [announced.message_id, audit.message_id]
    [push] = await stack.outbox.outstanding()
    assert push.key == f"push:{job_id}"
    bundle = json.loads(push.body)
    assert bundle["type"] == "transaction"
    assert [e["request"]["url"] for e in bundle["entry"]] == [r.reference for r in message.resources]


async def test_an_invalid_result_is_refused_for_good(stack: Stack) -> None:
    await stack.publisher.on_study_ready(ready(3, burst=1))
    event = two_nodules()
    event.findings[0].probability = float("nan")
    envelope = codec.encode(INFERENCE_COMPLETED, event, correlation_id=event.job_id)
    with pytest.raises(PermanentError, match="probability"):
        await stack.publisher.on_inference_completed(envelope)
    assert stack.bus.published == []
    assert await stack.outbox.outstanding() == []


async def test_lucerna_reindex_rebuilds_the_fhir_index_from_the_store(stack: Stack, tmp_path: Path) -> None:
    await stack.publisher.on_study_ready(ready(3, burst=1))
    await stack.publisher.on_inference_completed(completed())
    query = parse_search("DiagnosticReport", [("status", "preliminary")]).query
    assert len((await stack.resources.search(query)).resources) == 1
    await stack.resources.clear()
    assert (await stack.resources.search(query)).resources == []

    # As `lucerna reindex` does: adapters of its own on the configured store (here the same file).
    done = await FhirService().reindex(make_resources(tmp_path))
    assert done == "reindexed 9 FHIR resources"
    [report] = (await stack.resources.search(query)).resources
    assert report.resource_type == "DiagnosticReport"
