"""DICOMweb reads are found by FHIR Patient: the metadata service names the DICOM patient of what it
served (sealed at rest), the audit service indexes it as the Patient the FHIR service's settings make
of it, so ``AuditEvent?patient=Patient/<id>`` finds QIDO-RS, WADO-RS and FHIR reads of that patient
alike, and the log entries hold no PatientID."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from pydantic import SecretStr
from pydicom.uid import generate_uid

from lucerna.audit.accesses import patient_reference
from lucerna.audit.service import AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.publishing import PublishingSettings, patient_resource_id
from lucerna.fhir.service import FhirService
from lucerna.fhir.store import ResourceWrite
from lucerna.metadata.service import MetadataService
from tests.factories import ct_slice
from tests.unit.audit.test_auditevent_search import AUDITOR, EHR, SECRET
from tests.unit.metadata.dicomweb_testkit import part10, store_instance
from tests.unit.orchestrator.kit import embedded_resources

pytestmark = pytest.mark.unit

ISSUER, SYSTEM = "HOSP A", "urn:oid:1.2.3.4"


def test_a_dicom_patient_maps_to_the_patient_publishing_makes() -> None:
    settings = PublishingSettings(patient_identifier_system="urn:mrn", issuer_systems={ISSUER: SYSTEM})
    with_issuer = AuditRecord(
        dicom_patient=AuditRecord.DicomPatient(patient_id="P1", issuer_of_patient_id=ISSUER)
    )
    without = AuditRecord(dicom_patient=AuditRecord.DicomPatient(patient_id="P1"))
    assert (
        patient_reference(with_issuer, settings) == f"Patient/{patient_resource_id('P1', ISSUER, settings)}"
    )
    assert patient_resource_id("P1", ISSUER, settings) != patient_resource_id("P1", None, settings)
    assert patient_reference(AuditRecord(patient="Patient/x"), settings) == "Patient/x"
    assert patient_reference(AuditRecord(dicom_patient=AuditRecord.DicomPatient()), settings) == ""
    assert patient_reference(without, settings).startswith("Patient/")


@dataclass
class Platform:
    client: httpx.AsyncClient
    resources: Resources
    fhir: FhirService

    async def until(self, total: int, **params: str) -> dict[str, Any]:
        for _ in range(500):
            response = await self.client.get("/fhir/AuditEvent", params=params, headers=AUDITOR)
            assert response.status_code == 200, response.text
            found: dict[str, Any] = response.json()
            if found["total"] >= total:
                return found
            await asyncio.sleep(0.01)
        raise AssertionError(f"fewer than {total} AuditEvents for {params}")


@pytest.fixture
async def platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    monkeypatch.setenv("LUCERNA_FHIR_ISSUER_SYSTEMS", f'{{"{ISSUER}": "{SYSTEM}"}}')
    resources = embedded_resources(tmp_path, auth_required=True, jwt_secret=SecretStr(SECRET))
    audit = AuditService(AuditSettings(checkpoint_interval_ms=50, key_dir=tmp_path / "keys"))
    fhir = FhirService()
    app = create_app(resources, [MetadataService(), fhir, audit])
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lucerna") as client,
    ):
        yield Platform(client, resources, fhir)


async def test_qido_wado_and_fhir_reads_of_one_patient_are_found_by_that_patient(platform: Platform) -> None:
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 1, patient="ROE^ANN", size=16)
    ds.IssuerOfPatientID = ISSUER
    record = await store_instance(platform.resources.blobs, platform.resources.metadata, part10(ds))
    other = await store_instance(
        platform.resources.blobs,
        platform.resources.metadata,
        part10(ct_slice(generate_uid(), generate_uid(), 1, patient="DOE^JOHN", size=16)),
    )
    patient_id = str(ds.PatientID)
    fhir_id = patient_resource_id(patient_id, ISSUER, PublishingSettings(issuer_systems={ISSUER: SYSTEM}))
    repository = platform.fhir.repository
    assert repository is not None
    patient = {"resourceType": "Patient", "id": fhir_id}
    await repository.write([ResourceWrite("Patient", fhir_id, patient, canonical_sha256(patient), None)])

    qido = await platform.client.get("/dicom-web/studies", params={"PatientName": "ROE*"}, headers=EHR)
    assert qido.status_code == 200 and len(qido.json()) == 1
    wado = await platform.client.get(f"/dicom-web/studies/{study}/series/{series}/metadata", headers=EHR)
    assert wado.status_code == 200
    unrelated = await platform.client.get(f"/dicom-web/studies/{other.study_uid}/metadata", headers=EHR)
    assert unrelated.status_code == 200

    read = await platform.client.get(f"/fhir/Patient/{fhir_id}", headers=EHR)
    assert read.status_code == 200

    found = await platform.until(3, patient=f"Patient/{fhir_id}")
    assert found["total"] == 3  # not the unrelated study's read
    events = [AuditEvent.model_validate(entry["resource"]) for entry in found["entry"]]
    assert sorted(event.subtype[0].code or "" for event in events if event.subtype) == [
        "qido-rs",
        "read",
        "wado-rs",
    ]
    for event in events:
        [named] = [entity for entity in event.entity or [] if entity.role and entity.role.code == "1"]
        assert named.what is not None and named.what.reference == f"Patient/{fhir_id}"
    assert f"urn:oid:{record.study_uid}" in str(found) and other.study_uid not in str(found)
    everyone = await platform.until(4)
    assert everyone["total"] == 4

    for seq in range(4):  # the log's entries never hold the PatientID or its issuer
        entry = await platform.client.get(f"/api/audit/entries/{seq}", headers=AUDITOR)
        assert entry.status_code == 200, entry.text
        assert patient_id not in entry.text and ISSUER not in entry.text
