"""Audit records of FHIR reads: one per patient disclosed (IHE BALP), PHI only in the PHI fields, and
a bus that fails is retried, then logged without PHI, never failing anything."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

import pytest

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.fhir import read_audit
from lucerna.fhir.read_audit import FhirRead, ReadAuditor, audit_records

pytestmark = pytest.mark.unit

AT = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
QUERY = "/fhir/DiagnosticReport?identifier=MRN-SECRET"


def bundle(*resources: dict[str, object]) -> bytes:
    entries = [{"resource": resource, "search": {"mode": "match"}} for resource in resources]
    outcome = {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}}
    return json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [*entries, outcome]}).encode()


def search(body: bytes | None, status: int = 200, reference: str = "") -> FhirRead:
    return FhirRead("ehr", "search-type", "DiagnosticReport", reference, QUERY, status, body, AT, "req-1")


def test_one_record_per_patient_disclosed_and_one_for_resources_of_none() -> None:
    body = bundle(
        {"resourceType": "DiagnosticReport", "id": "r1", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p2"}},
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Provenance", "id": "v1"},
    )
    records = {record.patient: record for record in audit_records(search(body))}
    assert set(records) == {"Patient/p1", "Patient/p2", ""}
    assert list(records["Patient/p1"].entities) == ["DiagnosticReport/r1"]
    assert list(records["Patient/p2"].entities) == ["Observation/o1"]
    assert list(records[""].entities) == ["Provenance/v1"]
    for record in records.values():
        assert record.action == AuditRecord.PATIENT_DATA_READ and record.outcome == 0
        assert record.query == QUERY and record.subtype == "search-type" and record.actor == "ehr"
        assert "MRN-SECRET" not in str(dict(record.details))


def test_what_was_asked_for_when_nothing_was_disclosed() -> None:
    [empty] = audit_records(search(bundle()))
    assert empty.patient == "" and not empty.entities and empty.outcome == 0
    [missing] = audit_records(
        FhirRead("ehr", "read", "Patient", "Patient/p9", "/fhir/Patient/p9", 404, None, AT)
    )
    assert missing.patient == "Patient/p9" and not missing.entities and missing.outcome == 4
    [failed] = audit_records(search(None, status=500, reference="DiagnosticReport/r1"))
    assert failed.outcome == 8 and list(failed.entities) == ["DiagnosticReport/r1"]


class FailingBus:
    def __init__(self) -> None:
        self.attempts = 0

    async def publish(self, envelope: Envelope) -> None:
        self.attempts += 1
        raise ConnectionError("broker down")


class CapturingBus:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def publish(self, envelope: Envelope) -> None:
        self.records.append(codec.decode(envelope, AuditRecord))


async def test_the_worker_publishes_what_reads_queued(caplog: pytest.LogCaptureFixture) -> None:
    bus = CapturingBus()
    auditor = ReadAuditor(BusAuditTrail(bus))  # type: ignore[arg-type]
    stopping = asyncio.Event()
    worker = asyncio.create_task(auditor.run(stopping))
    auditor.note(search(bundle({"resourceType": "Patient", "id": "p1"})))
    auditor.note(search(b"not json"))
    stopping.set()
    await asyncio.wait_for(worker, 2)
    assert [record.patient for record in bus.records] == ["Patient/p1"]
    assert "did not parse" in caplog.text and "MRN-SECRET" not in caplog.text


async def test_a_failing_bus_is_retried_then_logged_without_phi(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_audit, "PUBLISH_RETRY_DELAYS", (0.0, 0.0))
    bus = FailingBus()
    auditor = ReadAuditor(BusAuditTrail(bus), max_pending=1)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        auditor.note(search(bundle({"resourceType": "Patient", "id": "p1"})))
        auditor.note(search(bundle()))  # the queue is full: logged, not raised
        await auditor.publish_pending()
    assert bus.attempts == 3
    assert "lost the audit record of a FHIR read" in caplog.text and "queue is full" in caplog.text
    logged = " ".join(str(vars(record)) for record in caplog.records)  # with the extras
    assert "MRN-SECRET" not in logged and "Patient/p1" not in logged and "ehr" in logged
