"""Audit records of patient-data reads (pure, with a fake bus): one per patient of the studies
disclosed, the patient known from the read or looked up in the store, never in the log."""

import logging
from collections.abc import Sequence

import pytest

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.storage.ports import StudyPatient
from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.metadata import audit
from lucerna.metadata.audit import PatientDataRead, audit_records, publish_read, redact

pytestmark = pytest.mark.unit


def test_patient_identifying_values_are_hashed() -> None:
    text = redact([("PatientName", "DOE^JOHN"), ("00100020", "P1"), ("Modality", "CT"), ("q", "doe")])
    assert "DOE" not in text and "P1" not in text and "doe" not in text
    assert "Modality=CT" in text
    assert text.count("sha256%3A") == 3


def test_record_of_a_read_of_one_study_names_its_patient() -> None:
    [record] = audit_records(
        PatientDataRead(
            actor="viewer-7",
            route="/dicom-web/studies/{study}",
            query=[],
            study_uids=["1.2", "1.2"],
            patients={"1.2": StudyPatient("MRN-7", "HOSP A")},
        )
    )
    assert record.action == AuditRecord.PATIENT_DATA_READ
    assert (record.service, record.actor, record.study_instance_uid) == ("metadata", "viewer-7", "1.2")
    assert (record.dicom_patient.patient_id, record.dicom_patient.issuer_of_patient_id) == ("MRN-7", "HOSP A")
    assert record.details["studies_returned"] == "1"
    assert "MRN-7" not in str(dict(record.details))
    assert record.at.seconds > 0


def test_a_search_gets_one_record_per_patient_and_one_for_studies_of_none() -> None:
    patients = {
        "1.1": StudyPatient("P1"),
        "1.2": StudyPatient("P2"),
        "1.3": StudyPatient("P1"),
        "1.4": StudyPatient(""),
    }
    read = PatientDataRead(
        actor="a", route="/dicom-web/studies", query=[], study_uids=["1.1", "1.2", "1.3", "1.4", "1.5"]
    )
    records = {record.dicom_patient.patient_id: record for record in audit_records(read, patients)}
    assert set(records) == {"P1", "P2", ""}
    assert records["P1"].study_instance_uid == "" and records["P1"].details["studies"] == "1.1,1.3"
    assert records["P2"].study_instance_uid == "1.2" and records["P2"].details["studies_returned"] == "1"
    assert not records[""].HasField("dicom_patient") and records[""].details["studies"] == "1.4,1.5"
    [empty] = audit_records(PatientDataRead(actor="a", route="/dicom-web/studies", query=[]))
    assert not empty.HasField("dicom_patient") and empty.details["studies_returned"] == "0"


class _Store:
    """The one store read the audit makes: the patients of studies the read did not know."""

    def __init__(self, patients: dict[str, StudyPatient], fail: bool = False) -> None:
        self.patients, self.fail, self.asked = patients, fail, list[list[str]]()

    async def study_patients(self, study_uids: Sequence[str]) -> dict[str, StudyPatient]:
        self.asked.append(list(study_uids))
        if self.fail:
            raise ConnectionError("store away")
        return {uid: self.patients[uid] for uid in study_uids if uid in self.patients}


async def test_patients_the_read_did_not_know_are_looked_up_once(caplog: pytest.LogCaptureFixture) -> None:
    read = PatientDataRead(
        actor="a",
        route="/dicom-web/studies",
        query=[("PatientID", "P1")],
        study_uids=["1.1", "1.2"],
        patients={"1.1": StudyPatient("P1", "H")},
    )
    bus = _FlakyBus(failures=0)
    store = _Store({"1.2": StudyPatient("P2")})
    await publish_read(BusAuditTrail(bus), read, store)  # type: ignore[arg-type]
    assert store.asked == [["1.2"]]
    published = [codec.decode(envelope, AuditRecord) for envelope in bus.published]
    assert sorted((r.dicom_patient.patient_id, r.study_instance_uid) for r in published) == [
        ("P1", "1.1"),
        ("P2", "1.2"),
    ]
    failing = _FlakyBus(failures=0)
    await publish_read(BusAuditTrail(failing), read, _Store({}, fail=True))  # type: ignore[arg-type]
    assert len(failing.published) == 2  # still audited: the unknown study without its patient
    assert "cannot find the patients of 1 studies" in caplog.text


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
    read = PatientDataRead(
        actor="a", route="/r", query=[], study_uids=["1.2"], patients={"1.2": StudyPatient("MRN-SECRET")}
    )
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
    logged = " ".join(str(vars(record)) for record in caplog.records)  # with the extras
    assert "1.2" in logged and "MRN-SECRET" not in logged
