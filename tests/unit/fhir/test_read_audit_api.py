"""The FHIR API audits reads from the stored versions it answered with, not from its response: the
patient of a resource is known even when ``_elements`` left its subject out, an included resource
counts as disclosed, a 304 discloses nothing, and the query (with a _search form) is kept as asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import BaseRoute

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.fhir.api import fhir_routes
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.read_audit import ReadAuditor
from lucerna.fhir.repository import Repository
from lucerna.fhir.store import ResourceWrite
from tests.unit.fhir.fakes import Clock, FakeIndex, FakeStore
from tests.unit.fhir.test_fhir_api import ALL, app_resources

pytestmark = pytest.mark.unit


class CapturingBus:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def publish(self, envelope: Envelope) -> None:
        self.records.append(codec.decode(envelope, AuditRecord))


class AuditedFhir:
    name = "fhir"

    def __init__(self, repository: Repository, auditor: ReadAuditor) -> None:
        self.repository, self.auditor = repository, auditor

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        return fhir_routes(resources, lambda: self.repository, auditor=lambda: self.auditor)

    async def start(self, resources: Resources) -> None:
        pass

    async def stop(self) -> None:
        pass


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1"},
    {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "nodule"},
     "subject": {"reference": "Patient/p1"}},
    {"resourceType": "DiagnosticReport", "id": "r1", "status": "final", "code": {"text": "CT"},
     "subject": {"reference": "Patient/p1"}, "result": [{"reference": "Observation/o1"}]},
]  # fmt: skip


@pytest.fixture
async def audited(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, ReadAuditor, CapturingBus]]:
    repository = Repository(FakeStore(Clock()), FakeIndex())
    await repository.write(
        [ResourceWrite(r["resourceType"], r["id"], r, canonical_sha256(r)) for r in RESOURCES]
    )
    bus = CapturingBus()
    auditor = ReadAuditor(BusAuditTrail(bus))  # type: ignore[arg-type]
    app = create_app(app_resources(tmp_path), [AuditedFhir(repository, auditor)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://fhir.test"
    ) as client:
        yield client, auditor, bus


async def published(auditor: ReadAuditor, bus: CapturingBus) -> list[AuditRecord]:
    await auditor.publish_pending()
    assert auditor.idle()
    records, bus.records = bus.records, []
    return records


async def test_a_search_names_the_patient_of_what_it_disclosed_even_when_elements_hid_it(
    audited: tuple[httpx.AsyncClient, ReadAuditor, CapturingBus],
) -> None:
    client, auditor, bus = audited
    asked = "/fhir/DiagnosticReport?_id=r1&_elements=status&_include=DiagnosticReport:result"
    response = await client.get(asked, headers=ALL)
    assert response.status_code == 200
    assert "subject" not in response.json()["entry"][0]["resource"]  # the match shows no patient
    [record] = await published(auditor, bus)
    assert record.patient == "Patient/p1" and record.subtype == "search-type"
    assert list(record.entities) == ["DiagnosticReport/r1", "Observation/o1"]  # the include too
    assert record.query == asked and record.actor == "ehr@hospital.example" and record.outcome == 0


async def test_a_search_form_is_audited_with_the_query_string(
    audited: tuple[httpx.AsyncClient, ReadAuditor, CapturingBus],
) -> None:
    client, auditor, bus = audited
    response = await client.post(
        "/fhir/Observation/_search?_count=5",
        content="subject=Patient/p1",
        headers={**ALL, "content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    [record] = await published(auditor, bus)
    assert record.query == "/fhir/Observation/_search?_count=5&subject=Patient/p1"
    assert record.patient == "Patient/p1" and list(record.entities) == ["Observation/o1"]


async def test_a_read_a_not_modified_and_a_history(
    audited: tuple[httpx.AsyncClient, ReadAuditor, CapturingBus],
) -> None:
    client, auditor, bus = audited
    read = await client.get("/fhir/Observation/o1", headers=ALL)
    unchanged = await client.get(
        "/fhir/Observation/o1", headers={**ALL, "if-none-match": read.headers["etag"]}
    )
    history = await client.get("/fhir/Patient/p1/_history", headers=ALL)
    assert (read.status_code, unchanged.status_code, history.status_code) == (200, 304, 200)
    first, not_modified, versions = await published(auditor, bus)
    assert (first.patient, list(first.entities), first.subtype) == ("Patient/p1", ["Observation/o1"], "read")
    assert (not_modified.patient, list(not_modified.entities)) == ("", ["Observation/o1"])  # nothing sent
    assert versions.patient == "Patient/p1" and versions.subtype == "history-instance"


async def test_the_worker_publishes_while_the_api_answers(
    audited: tuple[httpx.AsyncClient, ReadAuditor, CapturingBus],
) -> None:
    client, auditor, bus = audited
    stopping = asyncio.Event()
    worker = asyncio.create_task(auditor.run(stopping))
    for _ in range(30):
        assert (await client.get("/fhir/Patient/p1", headers=ALL)).status_code == 200
    stopping.set()
    await asyncio.wait_for(worker, 2)
    assert len(bus.records) == 30 and {record.patient for record in bus.records} == {"Patient/p1"}
