"""FHIR reads audited end to end in one process, the FHIR and audit services sharing one app (in both
orders): each read of patient data becomes an AuditEvent (IHE BALP) found by patient, agent, entity,
date, type, subtype, outcome and action, read by id, and tied to its log entry's inclusion proof."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from pydantic import SecretStr

from lucerna.audit import merkle
from lucerna.audit.service import AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.core.http import create_app
from lucerna.core.service import Service
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.service import FhirService
from lucerna.fhir.store import ResourceWrite
from tests.unit.orchestrator.kit import embedded_resources

pytestmark = pytest.mark.unit

SECRET = "auditevent-test-secret-0123456789abcdef"


def token(subject: str, scope: str) -> dict[str, str]:
    claims = {"sub": subject, "scope": scope, "exp": int(time.time()) + 3600}
    return {"authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


EHR = token("ehr@hospital.example", "system/*.read")
PACS = token("pacs@hospital.example", "system/*.read")
AUDITOR = token("auditor@hospital.example", "system/AuditEvent.read")


def patient(id: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": "urn:oid:1.2.3", "value": f"MRN-{id}"}],
    }


def report(id: str, patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "id": id,
        "status": "preliminary",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


@dataclass
class Platform:
    client: httpx.AsyncClient

    async def events(self, **params: str) -> dict[str, Any]:
        response = await self.client.get("/fhir/AuditEvent", params=params, headers=AUDITOR)
        assert response.status_code == 200, response.text
        Bundle.model_validate(response.json())
        found: dict[str, Any] = response.json()
        return found

    async def until(self, total: int, **params: str) -> dict[str, Any]:
        for _ in range(500):
            found = await self.events(**params)
            if found["total"] >= total:
                return found
            await asyncio.sleep(0.01)
        raise AssertionError(f"fewer than {total} AuditEvents for {params}")


@pytest.fixture(params=["fhir-first", "audit-first"])
async def platform(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Platform]:
    resources = embedded_resources(tmp_path, auth_required=True, jwt_secret=SecretStr(SECRET))
    fhir, audit = (
        FhirService(),
        AuditService(AuditSettings(checkpoint_interval_ms=50, key_dir=tmp_path / "keys")),
    )
    services: list[Service] = [fhir, audit] if request.param == "fhir-first" else [audit, fhir]
    app = create_app(resources, services)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lucerna") as client,
    ):
        assert fhir.repository is not None
        resources_ = [
            patient("p1"),
            patient("p2"),
            report("r1", "p1"),
            report("r2", "p1"),
            report("r3", "p2"),
        ]
        await fhir.repository.write(
            [ResourceWrite(r["resourceType"], r["id"], r, canonical_sha256(r), None) for r in resources_]
        )
        yield Platform(client)


async def test_a_fhir_read_becomes_an_auditevent_found_by_patient(platform: Platform) -> None:
    read = await platform.client.get("/fhir/DiagnosticReport/r1", headers=EHR)
    assert read.status_code == 200

    found = await platform.until(1, patient="Patient/p1")
    assert found["total"] == 1
    event = AuditEvent.model_validate(found["entry"][0]["resource"])
    assert event.type.code == "110110" and event.action == "R" and event.outcome == "0"
    assert event.subtype is not None and event.subtype[0].code == "read"
    assert event.agent[0].requestor is True and event.agent[0].who.identifier.value == "ehr@hospital.example"
    assert event.source.observer.display == "lucerna-fhir"
    whats = [entity.what.reference for entity in event.entity if entity.what and entity.what.reference]
    assert whats == ["Patient/p1", "DiagnosticReport/r1"]
    assert (await platform.events(patient="p2"))["total"] == 0
    assert (await platform.events(patient="p1", subtype="read", outcome="0"))["total"] == 1

    # From the AuditEvent to its proof: the leaf hash is the log entry's, included in the signed tree.
    [log_entry] = [entity for entity in event.entity if entity.role and entity.role.code == "13"]
    seq = int(log_entry.what.identifier.value)
    details = {detail.type: detail for detail in log_entry.detail}
    entry = (await platform.client.get(f"/api/audit/entries/{seq}", headers=AUDITOR)).json()
    assert merkle.leaf_hash(base64.b64decode(entry["data"])) == details["leaf_hash"].valueBase64Binary
    assert b"p1" not in base64.b64decode(entry["data"])  # the patient is sealed, not in the entry
    again = (await platform.client.get(f"/fhir/AuditEvent/{event.id}", headers=AUDITOR)).json()
    assert again == found["entry"][0]["resource"]


async def test_a_search_is_one_query_event_per_patient_with_the_query(platform: Platform) -> None:
    search = await platform.client.get(
        "/fhir/DiagnosticReport", params={"status": "preliminary"}, headers=PACS
    )
    assert search.status_code == 200 and search.json()["total"] == 3

    p1 = (await platform.until(1, patient="Patient/p1"))["entry"][0]["resource"]
    p2 = (await platform.until(1, patient="Patient/p2"))["entry"][0]["resource"]
    assert p1["type"]["code"] == "110112" and p1["action"] == "E"
    assert {e["what"]["reference"] for e in p1["entity"] if "reference" in e.get("what", {})} == {
        "Patient/p1",
        "DiagnosticReport/r1",
        "DiagnosticReport/r2",
    }
    [query] = [e for e in p2["entity"] if e["role"]["code"] == "24"]
    assert base64.b64decode(query["query"]).decode() == "/fhir/DiagnosticReport?status=preliminary"
    assert (await platform.events(entity="DiagnosticReport/r3"))["total"] == 1
    assert (await platform.events(entity="Patient/p1", agent="pacs@hospital.example"))["total"] == 1
    assert (await platform.events(agent="ehr@hospital.example"))["total"] == 0
    assert (await platform.events(type="http://dicom.nema.org/resources/ontology/DCM|110112"))["total"] == 2
    assert (await platform.events(action="R"))["total"] == 0


async def test_failed_reads_are_audited_and_writes_and_auditevents_are_not(platform: Platform) -> None:
    missing = await platform.client.get("/fhir/Patient/nobody", headers=EHR)
    assert missing.status_code == 404
    found = await platform.until(1, outcome="4")
    event = found["entry"][0]["resource"]
    assert event["entity"][0]["what"]["reference"] == "Patient/nobody"
    assert (await platform.events(patient="Patient/nobody"))["total"] == 1
    await platform.client.get("/fhir/Device", headers=EHR)  # no patient data
    await platform.client.get("/fhir/metadata")
    await platform.client.get("/fhir/Patient/p1", headers=EHR)
    await platform.until(1, patient="p1")
    assert (await platform.events())["total"] == 2


async def test_search_parameters_paging_and_errors(platform: Platform) -> None:
    for _ in range(3):
        await platform.client.get("/fhir/Patient/p2", headers=EHR)
    await platform.until(3, patient="p2")

    page = await platform.events(patient="p2", _count="2")
    assert len(page["entry"]) == 2 and page["total"] == 3
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert "_offset=2" in links["next"] and links["self"].startswith("http://lucerna/fhir/AuditEvent?")
    ids = [entry["resource"]["id"] for entry in page["entry"]]
    assert int(ids[0]) > int(ids[1])  # newest first
    recorded = page["entry"][0]["resource"]["recorded"]
    day = recorded[:10]
    assert (await platform.events(date=f"ge{day}", patient="p2"))["total"] == 3
    assert (await platform.events(date=f"lt{day}"))["total"] == 0
    assert (await platform.events(date=day[:7]))["total"] == 3
    assert (await platform.events(date="gt2999-01-01"))["total"] == 0

    for params, status in (
        ({"date": "sa2026"}, 400),
        ({"date": "yesterday"}, 400),
        ({"outcome": "3"}, 400),
        ({"_count": "-1"}, 400),
        ({"type": "http://other.example|110110"}, 400),
        ({"entity": "Patient/p1,DiagnosticReport/r1"}, 400),
    ):
        response = await platform.client.get("/fhir/AuditEvent", params=params, headers=AUDITOR)
        assert response.status_code == status, params
        assert response.json()["resourceType"] == "OperationOutcome"
    strict = await platform.client.get(
        "/fhir/AuditEvent", params={"colour": "red"}, headers={**AUDITOR, "prefer": "handling=strict"}
    )
    assert strict.status_code == 400 and "colour" in strict.json()["issue"][0]["diagnostics"]
    assert (await platform.client.get("/fhir/AuditEvent/999", headers=AUDITOR)).status_code == 404
    allowed = await platform.client.get("/fhir/AuditEvent", headers=EHR)  # system/*.read covers it
    assert allowed.status_code == 200
    denied = await platform.client.get("/fhir/AuditEvent", headers=token("x", "system/Patient.read"))
    assert denied.status_code == 403 and denied.json()["resourceType"] == "OperationOutcome"
