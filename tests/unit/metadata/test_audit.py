"""Audit records of patient-data reads (pure, with a fake bus)."""

import logging

import pytest

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.events.ports import Envelope
from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.metadata import audit
from lucerna.metadata.audit import PatientDataRead, audit_record, publish_read, redact

pytestmark = pytest.mark.unit


def test_patient_identifying_values_are_hashed() -> None:
    text = redact([("PatientName", "DOE^JOHN"), ("00100020", "P1"), ("Modality", "CT"), ("q", "doe")])
    assert "DOE" not in text and "P1" not in text and "doe" not in text
    assert "Modality=CT" in text
    assert text.count("sha256%3A") == 3


def test_record_of_a_read_of_one_study() -> None:
    record = audit_record(
        PatientDataRead(
            actor="viewer-7", route="/dicom-web/studies/{study}", query=[], study_uids=["1.2", "1.2"]
        )
    )
    assert record.action == AuditRecord.PATIENT_DATA_READ
    assert (record.service, record.actor, record.study_instance_uid) == ("metadata", "viewer-7", "1.2")
    assert record.details["studies_returned"] == "1"
    assert record.at.seconds > 0


def test_record_of_a_search_lists_the_studies_disclosed() -> None:
    record = audit_record(
        PatientDataRead(actor="a", route="/dicom-web/studies", query=[], study_uids=["1.1", "1.2"])
    )
    assert record.study_instance_uid == ""
    assert record.details["studies"] == "1.1,1.2"


class _FlakyBus:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[Envelope] = []

    async def publish(self, envelope: Envelope) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker away")
        self.published.append(envelope)


async def test_publishing_retries_then_logs_the_lost_record(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit, "PUBLISH_RETRY_DELAYS", (0.0, 0.0))
    read = PatientDataRead(actor="a", route="/r", query=[], study_uids=["1.2"], traceparent=None)
    recovering = _FlakyBus(failures=2)
    await publish_read(BusAuditTrail(recovering), read)  # type: ignore[arg-type]
    [envelope] = recovering.published
    assert (envelope.routing_key, envelope.correlation_id, envelope.type) == (
        "audit.record",
        "1.2",
        "lucerna.events.v1.AuditRecord",
    )
    with caplog.at_level(logging.ERROR, logger="lucerna.metadata.audit"):
        await publish_read(BusAuditTrail(_FlakyBus(failures=3)), read)  # type: ignore[arg-type]
    assert "lost the audit record" in caplog.text
