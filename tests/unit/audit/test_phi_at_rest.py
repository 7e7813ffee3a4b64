"""PHI at rest: a patient-data access's patient and query are sealed before the record becomes a log
entry; the entry, the index and every database file hold neither, yet an auditor's AuditEvent shows
them. The key file is private, and a redelivery keeps the first sealing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from lucerna.audit.accesses import Accesses
from lucerna.audit.auditevents import SqliteAuditEventIndex, indexed
from lucerna.audit.phi import KEY_FILE, PHI_DIGEST, PhiKeyError, PhiKeys, SqlitePhiStore, split_phi
from lucerna.audit.service import AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.core.events import codec
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.core.http import create_app
from lucerna.core.pqchannel import ChannelError
from lucerna.core.service import Resources
from lucerna.events.v1 import events_pb2
from tests.unit.orchestrator.kit import embedded_resources

pytestmark = pytest.mark.unit

PATIENT = "Patient/7f3c2e9a0b1d4c5e8f60718293a4b5c6"
QUERY = "/fhir/DiagnosticReport?patient=7f3c2e9a0b1d4c5e8f60718293a4b5c6&identifier=MRN-SECRET-0042"


def access(n: int = 1, patient: str = PATIENT, query: str = QUERY) -> events_pb2.AuditRecord:
    return events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.PATIENT_DATA_READ,
        service="fhir",
        at=datetime(2026, 11, 21, 10, 0, n, tzinfo=UTC),
        actor="ehr@hospital.example",
        patient=patient,
        query=query,
        subtype="search-type",
        entities=[f"DiagnosticReport/r{n}"],
    )


@dataclass
class Audit:
    resources: Resources
    service: AuditService
    client: httpx.AsyncClient
    data_dir: Path

    async def publish(self, record: events_pb2.AuditRecord, message_id: str) -> None:
        envelope = codec.encode(AUDIT_RECORD, record, correlation_id="test", message_id=message_id)
        await self.resources.bus.publish(envelope)

    async def entry(self, key: str) -> dict[str, object]:
        for _ in range(500):
            response = await self.client.get("/api/audit/entries", params={"key": key})
            if response.status_code == 200:
                found: dict[str, object] = response.json()
                return found
            await asyncio.sleep(0.01)
        raise AssertionError(f"no entry {key}")


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[Audit]:
    resources = embedded_resources(tmp_path)
    service = AuditService(AuditSettings(checkpoint_interval_ms=50, key_dir=tmp_path / "keys"))
    app = create_app(resources, [service])
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as client,
    ):
        yield Audit(resources, service, client, tmp_path)


async def test_the_log_and_the_files_hold_no_phi_and_the_auditevent_shows_it(audit: Audit) -> None:
    await audit.publish(access(), "read-1")
    entry = await audit.entry("read-1")

    record = entry["record"]
    assert isinstance(record, dict)
    assert "patient" not in record and "query" not in record
    assert record["entities"] == ["DiagnosticReport/r1"]
    accesses = audit.service._accesses
    assert accesses is not None
    blob = await accesses.phi.get("read-1")
    assert blob is not None
    assert record["details"] == {PHI_DIGEST: hashlib.sha256(blob).hexdigest()}

    await audit.client.get("/api/audit/checkpoints/latest")  # let the writers settle
    secrets = (PATIENT.split("/")[1].encode(), b"MRN-SECRET-0042")
    files = [path for path in audit.data_dir.rglob("*") if path.is_file() and "keys" not in path.parts]
    assert any(path.name.startswith("audit-phi") for path in files)
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret not in content, f"{secret!r} is in clear in {path.name}"

    found = (await audit.client.get("/fhir/AuditEvent", params={"patient": PATIENT})).json()
    assert found["total"] == 1
    event = found["entry"][0]["resource"]
    assert event["entity"][0]["what"]["reference"] == PATIENT


async def test_a_redelivered_record_keeps_its_first_sealing(audit: Audit) -> None:
    await audit.publish(access(), "read-1")
    first = await audit.entry("read-1")
    accesses = audit.service._accesses
    assert accesses is not None
    blob = await accesses.phi.get("read-1")

    await audit.publish(access(), "read-1")  # sealed again (a new random blob), appended once
    await audit.publish(access(2), "read-2")
    second = await audit.entry("read-2")

    again = await audit.entry("read-1")
    assert again["seq"] == first["seq"] and again["data"] == first["data"]
    assert second["seq"] == 1
    assert await accesses.phi.get("read-1") == blob
    assert (await audit.client.get("/fhir/AuditEvent", params={"patient": PATIENT})).json()["total"] == 2


def test_the_key_file_is_private_and_refused_when_open_to_others(tmp_path: Path) -> None:
    keys = PhiKeys.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert PhiKeys.load_or_create(tmp_path).patient_index(PATIENT) == keys.patient_index(PATIENT)
    os.chmod(path, 0o644)
    with pytest.raises(PhiKeyError, match="chmod 600"):
        PhiKeys.load_or_create(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(b"not a key")
    with pytest.raises(PhiKeyError, match="not a usable"):
        PhiKeys.load_or_create(tmp_path)


def test_the_blind_index_is_keyed_and_the_blob_opens_only_for_its_entry(tmp_path: Path) -> None:
    keys = PhiKeys.load_or_create(tmp_path / "a")
    other = PhiKeys.load_or_create(tmp_path / "b")
    index = keys.patient_index(PATIENT)
    assert index == keys.patient_index(PATIENT) != keys.patient_index("Patient/another")
    assert index != other.patient_index(PATIENT)  # another site's key: another index
    assert index != hashlib.sha256(PATIENT.encode()).hexdigest()  # not guessable without the key

    cleared, phi = split_phi(access())
    assert phi is not None and not cleared.patient and not cleared.query
    blob = keys.seal("read-1", phi)
    assert keys.open("read-1", blob).patient == PATIENT
    with pytest.raises(ChannelError):
        keys.open("read-2", blob)  # moved to another entry
    with pytest.raises(ChannelError):
        other.open("read-1", blob)
    assert split_phi(events_pb2.AuditRecord(actor="x"))[1] is None


async def test_a_record_without_phi_is_kept_as_sent_and_other_actions_are_not_indexed(tmp_path: Path) -> None:
    keys = PhiKeys.load_or_create(tmp_path)
    accesses = Accesses(
        keys, SqlitePhiStore(tmp_path / "phi.sqlite"), SqliteAuditEventIndex(tmp_path / "ix.sqlite")
    )
    await accesses.start()
    try:
        stored = events_pb2.AuditRecord(
            action=events_pb2.AuditRecord.INSTANCE_STORED, sop_instance_uid="1.2.3"
        )
        assert await accesses.entry_data("stored-1", stored) == stored.SerializeToString(deterministic=True)
        await accesses.indexed(0, "stored-1", stored)
        assert await accesses.index.get(0) is None
        await accesses.indexed(1, "read-1", access())
        row = await accesses.index.get(1)
        assert row == indexed(1, "read-1", access(), keys.patient_index(PATIENT))
    finally:
        await accesses.close()


async def test_a_dicomweb_read_record_is_an_auditevent_too(audit: Audit) -> None:
    qido = events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.PATIENT_DATA_READ,
        service="metadata",
        at=datetime(2026, 11, 21, 11, 0, tzinfo=UTC),
        actor="viewer",
        details={"route": "/dicom-web/studies", "query": "PatientID=sha256:abcd", "studies": "1.2.3,1.2.4"},
    )
    await audit.publish(qido, "qido-1")
    await audit.entry("qido-1")
    found = (
        await audit.client.get("/fhir/AuditEvent", params={"subtype": "qido-rs", "agent": "viewer"})
    ).json()
    [event] = [entry["resource"] for entry in found["entry"]]
    assert event["type"]["code"] == "110112" and event["source"]["observer"]["display"] == "lucerna-metadata"
    uids = [e["what"]["identifier"]["value"] for e in event["entity"] if e["role"]["code"] == "4"]
    assert uids == ["urn:oid:1.2.3", "urn:oid:1.2.4"]
    [query] = [e for e in event["entity"] if e["role"]["code"] == "24"]
    assert base64.b64decode(query["query"]) == b"PatientID=sha256:abcd"
