"""Audit records of FHIR reads: one per patient disclosed (IHE BALP), PHI only in the PHI fields, and
a bus that fails is retried, then logged without PHI, never failing anything."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.fhir import read_audit
from lucerna.fhir.read_audit import FhirRead, ReadAuditor, RememberedPatients, audit_records
from lucerna.fhir.store import StoredResource

pytestmark = pytest.mark.unit

AT = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
QUERY = "/fhir/DiagnosticReport?identifier=MRN-SECRET"


def stored(resource: Mapping[str, object], version: int = 1) -> StoredResource:
    body = json.dumps(resource).encode()
    return StoredResource(str(resource["resourceType"]), str(resource["id"]), version, AT, "", body)


def bundle(*resources: Mapping[str, object]) -> list[StoredResource]:
    """What a search answered: the stored versions it carried."""
    return [stored(resource) for resource in resources]


def search(disclosed: list[StoredResource], status: int = 200, reference: str = "") -> FhirRead:
    return FhirRead(
        "ehr", "search-type", "DiagnosticReport", reference, QUERY, status, disclosed, AT.timestamp(), "req-1"
    )


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
    assert empty.at.ToDatetime(tzinfo=UTC) == AT
    [missing] = audit_records(
        FhirRead("ehr", "read", "Patient", "Patient/p9", "/fhir/Patient/p9", 404, (), AT.timestamp())
    )
    assert missing.patient == "Patient/p9" and not missing.entities and missing.outcome == 4
    [failed] = audit_records(search([], status=500, reference="DiagnosticReport/r1"))
    assert failed.outcome == 8 and list(failed.entities) == ["DiagnosticReport/r1"]


def test_a_deleted_version_in_a_history_discloses_nothing() -> None:
    deleted = StoredResource("DiagnosticReport", "r1", 2, AT, "", None)
    [record] = audit_records(search([deleted, stored({"resourceType": "Observation", "id": "o1"})]))
    assert record.patient == "" and list(record.entities) == ["Observation/o1"]


def test_the_patient_of_a_version_is_parsed_once_and_a_new_version_again() -> None:
    patients = RememberedPatients(size=2)

    def report(version: int, subject: str) -> StoredResource:
        resource = {"resourceType": "DiagnosticReport", "id": "r1", "subject": {"reference": subject}}
        return stored(resource, version)

    assert patients(report(1, "Patient/p1")) == "Patient/p1"
    unparsable = StoredResource("DiagnosticReport", "r1", 1, AT, "", b"not json: must not be parsed")
    assert patients(unparsable) == "Patient/p1"  # remembered: this version is not parsed again
    assert patients(report(2, "Patient/p2")) == "Patient/p2"  # a new version is
    assert patients(StoredResource("Patient", "p7", 3, AT, "", b"{}")) == "Patient/p7"


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
    broken = StoredResource("DiagnosticReport", "r9", 1, AT, "", b"not json")
    auditor.note(search([broken]))
    auditor.note(search(bundle(*({"resourceType": "Patient", "id": f"p{n}"} for n in range(2, 40)))))
    stopping.set()
    await asyncio.wait_for(worker, 2)
    assert [record.patient for record in bus.records][:1] == ["Patient/p1"]
    many = sorted(f"Patient/p{n}" for n in range(2, 40))  # published in several lanes, all of them
    assert sorted(record.patient for record in bus.records[1:]) == many
    assert auditor.idle()
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
