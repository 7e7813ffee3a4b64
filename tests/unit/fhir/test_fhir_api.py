"""The FHIR REST API over HTTP, on the in-memory store and index: reads, history, search, Subscription
writes, errors and scopes. Every response is parsed with the fhir.resources R4B models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.resource import Resource
from pydantic import SecretStr
from starlette.routing import BaseRoute

from lucerna.core.auth import Authenticator
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from lucerna.fhir.api import fhir_routes
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.deliveries import SqliteDeliveryOutbox
from lucerna.fhir.event_numbers import SqliteEventNumbers
from lucerna.fhir.notifier import Notifier
from lucerna.fhir.repository import Repository
from lucerna.fhir.search import PARAMETERS
from lucerna.fhir.store import ResourceWrite
from lucerna.fhir.subscriptions import TOPIC
from tests.unit.fhir.fakes import Clock, FakeIndex, FakeStore

SECRET = "fhir-api-test-secret-0123456789abcdef"
BASE = "http://fhir.test/fhir"
LOINC = "http://loinc.org"
CT_REPORT = "18748-4"
MR_REPORT = "18755-9"
SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")


def token(scope: str) -> dict[str, str]:
    claims = {"sub": "ehr@hospital.example", "scope": scope, "exp": int(time.time()) + 3600}
    return {"authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


ALL = token("system/*.read system/Subscription.write")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- The data ------------------------------------------------------------------------------------


def patient(id: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": "urn:oid:1.2.3", "value": f"MRN-{id}"}],
        "name": [{"family": f"Family{id}", "given": ["Given"]}],
    }


def study(id: str, patient_id: str, modalities: Sequence[str]) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": id,
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
        "series": [
            {
                "uid": f"1.2.{id}.{n}",
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality},
            }
            for n, modality in enumerate(modalities)
        ],
    }


def observation(id: str, patient_id: str, study_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "427359005"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "derivedFrom": [{"reference": f"ImagingStudy/{study_id}"}],
        "device": {"reference": "Device/algo"},
    }


def report(
    id: str, patient_id: str, code: str, effective: str, results: Sequence[str], study_id: str
) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "id": id,
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">AI report</div>'},
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective,
        "imagingStudy": [{"reference": f"ImagingStudy/{study_id}"}],
        "result": [{"reference": f"Observation/{r}"} for r in results],
        "conclusion": "No acute findings",
    }


def provenance(id: str, target: str) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "id": id,
        "target": [{"reference": target}],
        "recorded": "2023-09-10T10:00:00Z",
        "agent": [{"who": {"reference": "Device/algo"}}],
    }


# Reports for the reference searches: (id, patient, code, effective).
REPORTS = [
    (f"r{n}", "123" if n % 3 else "456", CT_REPORT if n % 2 else MR_REPORT, f"2023-09-{1 + n:02d}T08:00:00Z")
    for n in range(1, 26)
]


@dataclass
class Fhir:
    client: httpx.AsyncClient
    repository: Repository
    clock: Clock
    data: dict[str, dict[str, Any]]

    async def put(self, resource: dict[str, Any], when: str | None = None) -> None:
        if when is not None:
            self.clock.now = at(when)
        write = ResourceWrite(resource["resourceType"], resource["id"], resource, canonical_sha256(resource))
        await self.repository.write([write])
        self.data[f"{resource['resourceType']}/{resource['id']}"] = resource


class FhirService:
    """The API alone as a service, the way the FHIR service mounts it."""

    name = "fhir"

    def __init__(self, repository: Repository | None, notifier: Notifier | None = None) -> None:
        self.repository = repository
        self.notifier = notifier

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        return fhir_routes(resources, lambda: self.repository, notifier=lambda: self.notifier)

    async def start(self, resources: Resources) -> None:
        pass

    async def stop(self) -> None:
        pass


def app_resources(tmp_path: Path) -> Resources:
    config = CoreSettings(data_dir=tmp_path, auth_required=True, jwt_secret=SecretStr(SECRET))
    return Resources(
        settings=config,
        auth=Authenticator(config),
        bus=InProcessBus(),
        blobs=FilesystemBlobStore(tmp_path / "blobs"),
        metadata=SqliteMetadataStore(tmp_path / "metadata.sqlite"),
        search=SqliteSearchIndex(tmp_path / "search.sqlite"),
    )


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[Fhir]:
    clock = Clock()
    repository = Repository(FakeStore(clock), FakeIndex())
    outbox = SqliteDeliveryOutbox(tmp_path / "deliveries.sqlite")
    numbers = SqliteEventNumbers(tmp_path / "subscriptions.sqlite")
    await outbox.start()
    await numbers.start()
    notifier = Notifier(repository, outbox, numbers)
    app = create_app(app_resources(tmp_path), [FhirService(repository, notifier)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://fhir.test"
    ) as client:
        api = Fhir(client, repository, clock, {})
        await api.put(patient("123"), "2023-08-01T00:00:00")
        await api.put(patient("456"))
        await api.put(
            {
                "resourceType": "Device",
                "id": "algo",
                "deviceName": [{"name": "nodules", "type": "model-name"}],
            }
        )
        await api.put(study("s1", "123", ["CT"]), "2023-08-15T00:00:00")
        await api.put(study("s2", "123", ["CT", "SR"]), "2023-09-10T00:00:00")
        await api.put(study("s3", "123", ["MR"]), "2023-09-12T00:00:00")
        await api.put(study("s4", "456", ["CT"]), "2023-09-15T00:00:00")
        await api.put(study("s5", "123", ["CT"]), "2023-09-01T12:00:00")  # on the day: not gt 2023-09-01
        await api.put(observation("o1", "123", "s2"), "2023-09-10T09:00:00")
        await api.put(observation("o2", "123", "s2"))
        for id, patient_id, code, effective in REPORTS:
            results = ["o1", "o2"] if id == "r1" else []
            await api.put(report(id, patient_id, code, effective, results, "s2"))
        await api.put(provenance("pv1", "DiagnosticReport/r1"))
        await api.put(provenance("pv2", "DiagnosticReport/r2"))
        yield api
    await outbox.close()
    await numbers.close()


def parse(response: httpx.Response) -> Resource:
    """The response body as its R4B model (every body this API sends is a FHIR resource)."""
    assert response.headers["content-type"] == "application/fhir+json; fhirVersion=4.0"
    body = response.json()
    model = get_fhir_model_class(body["resourceType"]).model_validate(body)
    assert isinstance(model, Resource)
    return model


def outcome(response: httpx.Response, status: int) -> str:
    """The diagnostics of an OperationOutcome answered with ``status``."""
    assert response.status_code == status, response.text
    parsed = parse(response)
    assert isinstance(parsed, OperationOutcome)
    [issue] = parsed.issue
    assert issue.diagnostics
    return issue.diagnostics


def bundle(response: httpx.Response) -> Bundle:
    assert response.status_code == 200, response.text
    parsed = parse(response)
    assert isinstance(parsed, Bundle)
    for entry in parsed.entry or []:  # entries parse as their own types too
        assert entry.resource is not None
    return parsed


def ids(parsed: Bundle, mode: str = "match") -> list[str]:
    return [
        f"{entry.resource.get_resource_type()}/{entry.resource.id}"
        for entry in parsed.entry or []
        if entry.search is not None and entry.search.mode == mode and entry.resource is not None
    ]


def link(parsed: Bundle, relation: str) -> str | None:
    return next((item.url for item in parsed.link or [] if item.relation == relation), None)


# --- Metadata ------------------------------------------------------------------------------------


async def test_capability_statement_tells_what_is_served(fhir: Fhir) -> None:
    response = await fhir.client.get("/fhir/metadata")  # no token: SMART allows it
    statement = parse(response)
    assert isinstance(statement, CapabilityStatement)
    assert statement.fhirVersion == "4.0.1"
    assert statement.implementation is not None
    assert statement.implementation.url == BASE
    [rest] = statement.rest or []
    by_type = {resource.type: resource for resource in rest.resource or []}
    assert set(by_type) == set(PARAMETERS)
    report_caps = by_type["DiagnosticReport"]
    assert [i.code for i in report_caps.interaction or []] == [
        "read",
        "vread",
        "history-instance",
        "history-type",
        "search-type",
    ]
    assert {p.name: p.type for p in report_caps.searchParam or []}["date"] == "date"
    assert "DiagnosticReport:result" in (report_caps.searchInclude or [])
    assert "Provenance:target" in (report_caps.searchRevInclude or [])
    assert report_caps.conditionalRead == "full-support"
    assert report_caps.updateCreate is False
    assert report_caps.readHistory is True
    subscription = by_type["Subscription"]
    assert {"create", "update", "delete"} <= {i.code for i in subscription.interaction or []}
    assert subscription.versioning == "versioned-update"
    assert [(e.url, e.valueCanonical) for e in subscription.extension or []] == [
        (
            "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical",
            TOPIC,
        )
    ]
    assert [o.name for o in subscription.operation or []] == ["status"]
    xml = await fhir.client.get("/fhir/metadata", params={"_format": "xml"})
    assert "only JSON" in outcome(xml, 406)


# --- Reads ---------------------------------------------------------------------------------------


async def test_read_sends_the_stored_body_with_etag_and_last_modified(fhir: Fhir) -> None:
    response = await fhir.client.get("/fhir/DiagnosticReport/r1", headers=ALL)
    assert response.status_code == 200
    stored = await fhir.repository.store.read("DiagnosticReport", "r1")
    assert stored is not None
    assert response.content == stored.body
    parsed = parse(response)
    assert parsed.id == "r1"
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["last-modified"] == format_datetime(stored.last_updated, usegmt=True)
    same = await fhir.client.get("/fhir/DiagnosticReport/r1", headers={**ALL, "if-none-match": 'W/"1"'})
    assert (same.status_code, same.content) == (304, b"")
    other = await fhir.client.get("/fhir/DiagnosticReport/r1", headers={**ALL, "if-none-match": 'W/"7"'})
    assert other.status_code == 200
    later = format_datetime(stored.last_updated + timedelta(seconds=1), usegmt=True)
    earlier = format_datetime(stored.last_updated - timedelta(seconds=1), usegmt=True)
    not_modified = await fhir.client.get(
        "/fhir/DiagnosticReport/r1", headers={**ALL, "if-modified-since": later}
    )
    assert not_modified.status_code == 304
    modified = await fhir.client.get(
        "/fhir/DiagnosticReport/r1", headers={**ALL, "if-modified-since": earlier}
    )
    assert modified.status_code == 200


async def test_unknown_deleted_and_unserved(fhir: Fhir) -> None:
    assert "DiagnosticReport/nope is not known" in outcome(
        await fhir.client.get("/fhir/DiagnosticReport/nope", headers=ALL), 404
    )
    await fhir.repository.delete("Observation", "o2")
    gone = await fhir.client.get("/fhir/Observation/o2", headers=ALL)
    assert "Observation/o2 was deleted (version 2)" in outcome(gone, 410)
    assert "'Medication' is not served" in outcome(
        await fhir.client.get("/fhir/Medication/1", headers=ALL), 404
    )
    assert "not a FHIR interaction" in outcome(
        await fhir.client.get("/fhir/Patient/1/$everything/x", headers=ALL), 404
    )


async def test_vread_and_history(fhir: Fhir) -> None:
    changed = {**fhir.data["Patient/123"], "gender": "female"}
    await fhir.put(changed)
    first = await fhir.client.get("/fhir/Patient/123/_history/1", headers=ALL)
    assert first.status_code == 200
    assert first.headers["etag"] == 'W/"1"'
    assert getattr(parse(first), "gender", None) is None
    second = parse(await fhir.client.get("/fhir/Patient/123/_history/2", headers=ALL))
    assert getattr(second, "gender", None) == "female"
    assert "no version 9" in outcome(await fhir.client.get("/fhir/Patient/123/_history/9", headers=ALL), 404)
    assert "no version x" in outcome(await fhir.client.get("/fhir/Patient/123/_history/x", headers=ALL), 404)
    history = bundle(await fhir.client.get("/fhir/Patient/123/_history", headers=ALL))
    assert history.type == "history"
    assert history.total == 2
    entries = history.entry or []
    assert [e.response.etag for e in entries if e.response] == ['W/"2"', 'W/"1"']
    assert [e.request.method for e in entries if e.request] == ["PUT", "POST"]
    typed = bundle(await fhir.client.get("/fhir/ImagingStudy/_history", params={"_count": 2}, headers=ALL))
    assert typed.total == 5
    assert [e.resource.id for e in typed.entry or [] if e.resource] == ["s4", "s3"]
    next_page = link(typed, "next")
    assert next_page is not None
    assert next_page.startswith(f"{BASE}/ImagingStudy/_history?")
    page_two = bundle(await fhir.client.get(next_page, headers=ALL))
    assert [e.resource.id for e in page_two.entry or [] if e.resource] == ["s2", "s5"]
    since = bundle(
        await fhir.client.get("/fhir/ImagingStudy/_history", params={"_since": "2023-09-11"}, headers=ALL)
    )
    assert since.total == 2
    bad = await fhir.client.get("/fhir/ImagingStudy/_history", params={"_since": "yesterday"}, headers=ALL)
    assert "_since" in outcome(bad, 400)
    strict = await fhir.client.get(
        "/fhir/ImagingStudy/_history", params={"_at": "2023"}, headers={**ALL, "prefer": "handling=strict"}
    )
    assert "_at" in outcome(strict, 400)


# --- Search --------------------------------------------------------------------------------------


async def test_the_design_notes_example(fhir: Fhir) -> None:
    response = await fhir.client.get(
        "/fhir/ImagingStudy?patient=123&modality=CT&_lastUpdated=gt2023-09-01", headers=ALL
    )
    found = bundle(response)
    stored = {
        ref: await fhir.repository.store.read(*ref.split("/"))
        for ref in fhir.data
        if ref.startswith("ImagingStudy/")
    }
    expected = sorted(
        ref
        for ref, resource in fhir.data.items()
        if resource["resourceType"] == "ImagingStudy"
        and resource["subject"]["reference"] == "Patient/123"
        and any(s["modality"]["code"] == "CT" for s in resource["series"])
        and (s := stored[ref]) is not None
        and s.last_updated >= at("2023-09-02T00:00:00")
    )
    assert expected == ["ImagingStudy/s2"]
    assert ids(found) == expected
    assert found.total == 1
    assert link(found, "self") == f"{BASE}/ImagingStudy?patient=123&modality=CT&_lastUpdated=gt2023-09-01"


async def test_search_by_patient_code_and_date_matches_a_reference(fhir: Fhir) -> None:
    params = {
        "patient": "Patient/123",
        "code": f"{LOINC}|{CT_REPORT}",
        "date": "ge2023-09-10",
        "_count": "100",
    }
    found = bundle(await fhir.client.get("/fhir/DiagnosticReport", params=params, headers=ALL))
    expected = sorted(
        f"DiagnosticReport/{id}"
        for id, patient_id, code, effective in REPORTS
        if patient_id == "123" and code == CT_REPORT and effective >= "2023-09-10"
    )
    assert len(expected) > 2
    assert sorted(ids(found)) == expected
    assert found.total == len(expected)
    for entry in found.entry or []:
        assert entry.fullUrl == f"{BASE}/DiagnosticReport/{entry.resource.id if entry.resource else ''}"
    posted = await fhir.client.post("/fhir/DiagnosticReport/_search", data=params, headers=ALL)
    assert sorted(ids(bundle(posted))) == expected


async def test_paging_links_walk_every_match_once(fhir: Fhir) -> None:
    url: str | None = f"{BASE}/DiagnosticReport?patient=123&_sort=date&_count=4"
    expected = [
        f"DiagnosticReport/{id}"
        for id, patient_id, _, effective in sorted(REPORTS, key=lambda r: r[3])
        if patient_id == "123"
    ]
    seen: list[str] = []
    pages = 0
    while url is not None:
        page = bundle(await fhir.client.get(url, headers=ALL))
        assert page.total == len(expected)
        seen += ids(page)
        pages += 1
        if pages > 1:
            assert link(page, "previous") is not None
        url = link(page, "next")
    assert seen == expected
    assert pages == (len(expected) + 3) // 4
    no_total = bundle(
        await fhir.client.get("/fhir/DiagnosticReport", params={"_total": "none", "_count": "2"}, headers=ALL)
    )
    assert no_total.total is None
    assert link(no_total, "next") is not None
    query = parse_qs(urlsplit(link(no_total, "next") or "").query)
    assert (query["_count"], query["_offset"]) == (["2"], ["2"])


async def test_include_and_revinclude(fhir: Fhir) -> None:
    found = bundle(
        await fhir.client.get(
            "/fhir/DiagnosticReport",
            params=[
                ("_id", "r1"),
                ("_include", "DiagnosticReport:result"),
                ("_include", "DiagnosticReport:subject"),
                ("_include", "DiagnosticReport:imaging-study"),
                ("_revinclude", "Provenance:target"),
            ],
            headers=ALL,
        )
    )
    assert ids(found) == ["DiagnosticReport/r1"]
    assert sorted(ids(found, "include")) == sorted(
        ["Observation/o1", "Observation/o2", "Patient/123", "ImagingStudy/s2", "Provenance/pv1"]
    )
    assert found.total == 1  # included resources are not counted


async def test_include_needs_read_on_what_it_adds(fhir: Fhir) -> None:
    reports_only = token("system/DiagnosticReport.read")
    params = {"_id": "r1", "_revinclude": "Provenance:target"}
    refused = await fhir.client.get("/fhir/DiagnosticReport", params=params, headers=reports_only)
    assert "system/Provenance.read is required for _revinclude=Provenance:target" in outcome(refused, 403)
    assert refused.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    subject = {"_id": "r1", "_include": "DiagnosticReport:subject:Patient"}
    with_patient = token("system/DiagnosticReport.read system/Patient.read")
    assert ids(
        bundle(await fhir.client.get("/fhir/DiagnosticReport", params=subject, headers=with_patient)),
        "include",
    ) == ["Patient/123"]
    # Without a target type, every served type the parameter can point to (Patient and Device).
    any_subject = {"_id": "r1", "_include": "DiagnosticReport:subject"}
    refused = await fhir.client.get("/fhir/DiagnosticReport", params=any_subject, headers=with_patient)
    assert "system/Device.read" in outcome(refused, 403)


async def shaped_report(fhir: Fhir, **params: str) -> DiagnosticReport:
    """Report r1 as a search with ``params`` sends it."""
    found = bundle(
        await fhir.client.get("/fhir/DiagnosticReport", params={"_id": "r1", **params}, headers=ALL)
    )
    [entry] = found.entry or []
    assert isinstance(entry.resource, DiagnosticReport)
    return entry.resource


def tags(resource: DiagnosticReport) -> list[tuple[str | None, str | None]]:
    return [(tag.system, tag.code) for tag in (resource.meta.tag or [] if resource.meta else [])]


async def test_summary_and_elements(fhir: Fhir) -> None:
    count = bundle(await fhir.client.get("/fhir/DiagnosticReport", params={"_summary": "count"}, headers=ALL))
    assert (count.total, count.entry) == (len(REPORTS), None)
    summary = await shaped_report(fhir, _summary="true")
    assert summary.status == "final"
    assert (summary.conclusion, summary.result, summary.text) == (None, None, None)  # not summary elements
    assert tags(summary) == [SUBSETTED]
    assert summary.meta is not None
    assert summary.meta.versionId == "1"
    text = await shaped_report(fhir, _summary="text")
    assert (text.text is not None, text.status, text.code is not None, text.subject) == (
        True,
        "final",
        True,
        None,
    )
    data = await shaped_report(fhir, _summary="data")
    assert (data.text, data.conclusion) == (None, "No acute findings")
    assert tags(data) == [SUBSETTED]
    elements = await shaped_report(fhir, _elements="subject,conclusion")
    assert elements.subject is not None
    assert elements.conclusion == "No acute findings"
    assert (elements.status, elements.code is not None) == ("final", True)  # mandatory
    assert (elements.result, elements.effectiveDateTime) == (None, None)
    assert tags(elements) == [SUBSETTED]
    whole = await shaped_report(fhir, _summary="false")
    assert (whole.conclusion, tags(whole)) == ("No acute findings", [])
    read = parse(
        await fhir.client.get("/fhir/DiagnosticReport/r1", params={"_elements": "status"}, headers=ALL)
    )
    assert getattr(read, "conclusion", None) is None


async def test_unknown_parameters_follow_prefer_handling(fhir: Fhir) -> None:
    lenient = bundle(
        await fhir.client.get("/fhir/ImagingStudy", params={"modality": "MR", "colour": "blue"}, headers=ALL)
    )
    assert ids(lenient) == ["ImagingStudy/s3"]
    assert link(lenient, "self") == f"{BASE}/ImagingStudy?modality=MR"
    [warning] = [e for e in lenient.entry or [] if e.search and e.search.mode == "outcome"]
    assert isinstance(warning.resource, OperationOutcome)
    strict = await fhir.client.get(
        "/fhir/ImagingStudy",
        params={"modality": "MR", "colour": "blue"},
        headers={**ALL, "prefer": "handling=strict"},
    )
    assert "unknown search parameter 'colour'" in outcome(strict, 400)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"date": "gtyesterday"}, "is not a date"),
        ({"_count": "many"}, "_count must be a whole number"),
        ({"_sort": "status"}, "cannot sort by 'status'"),
        ({"patient": "Device/1"}, "patient refers to Patient, not Device"),
        ({"_summary": "maybe"}, "_summary must be"),
    ],
)
async def test_bad_search_values_are_400(fhir: Fhir, params: dict[str, str], message: str) -> None:
    response = await fhir.client.get("/fhir/DiagnosticReport", params=params, headers=ALL)
    assert message in outcome(response, 400)


async def test_json_only(fhir: Fhir) -> None:
    xml = await fhir.client.get("/fhir/Patient/123", headers={**ALL, "accept": "application/fhir+xml"})
    assert "only application/fhir+json" in outcome(xml, 406)
    assert outcome(await fhir.client.get("/fhir/Patient", params={"_format": "xml"}, headers=ALL), 406)
    fine = await fhir.client.get("/fhir/Patient/123", params={"_format": "json"}, headers=ALL)
    assert fine.status_code == 200


# --- Auth and availability -----------------------------------------------------------------------


async def test_tokens_and_scopes(fhir: Fhir, tmp_path: Path) -> None:
    missing = await fhir.client.get("/fhir/Patient/123")
    assert "bearer token is required" in outcome(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = await fhir.client.get("/fhir/Patient/123", headers=token("system/Observation.read"))
    assert "system/Patient.read is required" in outcome(wrong, 403)
    read_only = await fhir.client.post(
        "/fhir/Subscription", json=subscription_body(), headers=token("system/*.read")
    )
    assert "system/Subscription.write is required" in outcome(read_only, 403)
    app = create_app(app_resources(tmp_path / "starting"), [FhirService(None)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://fhir.test"
    ) as client:
        starting = await client.get("/fhir/Patient/123", headers=ALL)
        assert "starting" in outcome(starting, 503)


# --- Subscription writes -------------------------------------------------------------------------


def subscription_body(**changes: Any) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "New AI reports",
        "criteria": TOPIC,
        "_criteria": {
            "extension": [
                {
                    "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
                    "valueString": "DiagnosticReport?patient=Patient/123",
                }
            ]
        },
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://ehr.example/hook",
            "payload": "application/fhir+json",
        },
        **changes,
    }


FHIR_JSON_BODY = {"content-type": "application/fhir+json"}


async def test_subscription_create_update_delete(fhir: Fhir) -> None:
    headers = {**ALL, **FHIR_JSON_BODY}
    created = await fhir.client.post(
        "/fhir/Subscription", json=subscription_body(id="ignored"), headers=headers
    )
    assert created.status_code == 201, created.text
    resource = parse(created)
    assert resource.id != "ignored"
    assert created.headers["etag"] == 'W/"1"'
    assert created.headers["location"] == f"{BASE}/Subscription/{resource.id}/_history/1"
    path = f"/fhir/Subscription/{resource.id}"
    body = subscription_body(id=resource.id, status="off")
    updated = await fhir.client.put(path, json=body, headers={**headers, "if-match": 'W/"1"'})
    assert updated.status_code == 200, updated.text
    assert updated.headers["etag"] == 'W/"2"'
    assert getattr(parse(updated), "status", None) == "off"
    stale = await fhir.client.put(
        path, json=subscription_body(id=resource.id), headers={**headers, "if-match": 'W/"1"'}
    )
    assert "version 2, not 1" in outcome(stale, 412)
    found = bundle(await fhir.client.get("/fhir/Subscription", params={"status": "off"}, headers=ALL))
    assert ids(found) == [f"Subscription/{resource.id}"]
    deleted = await fhir.client.delete(path, headers=ALL)
    assert "deleted (version 3)" in outcome(deleted, 200)
    assert outcome(await fhir.client.get(path, headers=ALL), 410)
    again = await fhir.client.delete(path, headers=ALL)
    assert "already deleted" in outcome(again, 200)
    assert outcome(await fhir.client.delete("/fhir/Subscription/nope", headers=ALL), 404)
    assert "update does not create" in outcome(
        await fhir.client.put("/fhir/Subscription/nope", json=subscription_body(id="nope"), headers=headers),
        404,
    )


@pytest.mark.parametrize(
    ("content", "content_type", "status", "message"),
    [
        (b"{not json", "application/fhir+json", 400, "not valid JSON"),
        (b"[]", "application/fhir+json", 400, "must be a JSON object"),
        (b'{"resourceType": "Patient"}', "application/fhir+json", 400, "resourceType is 'Patient'"),
        (
            b'{"resourceType": "Subscription", "status": "requested"}',
            "application/fhir+json",
            422,
            "Subscription.channel: Field required",
        ),
        (b"{}", "text/plain", 415, "application/fhir+json"),
        (b"{" + b" " * 1_000_001 + b"}", "application/fhir+json", 413, "larger than 1000000 bytes"),
    ],
)
async def test_bad_subscription_bodies(
    fhir: Fhir, content: bytes, content_type: str, status: int, message: str
) -> None:
    response = await fhir.client.post(
        "/fhir/Subscription", content=content, headers={**ALL, "content-type": content_type}
    )
    assert message in outcome(response, status)


async def test_subscription_status_and_refusals(fhir: Fhir) -> None:
    headers = {**ALL, **FHIR_JSON_BODY}
    created = parse(await fhir.client.post("/fhir/Subscription", json=subscription_body(), headers=headers))
    assert getattr(created, "status", None) == "requested"  # until its handshake succeeds
    answer = await fhir.client.get(f"/fhir/Subscription/{created.id}/$status", headers=ALL)
    status = bundle(answer)
    assert status.type == "searchset"
    assert answer.json()["entry"][0]["resource"]["parameter"][3] == {
        "name": "type",
        "valueCode": "query-status",
    }
    assert outcome(await fhir.client.get("/fhir/Subscription/nope/$status", headers=ALL), 404)
    assert "operation on Subscription" in outcome(
        await fhir.client.get("/fhir/Patient/123/$status", headers=ALL), 404
    )
    other_topic = subscription_body(criteria="DiagnosticReport?patient=Patient/123")
    refused = await fhir.client.post("/fhir/Subscription", json=other_topic, headers=headers)
    assert "Subscription.criteria must be the topic" in outcome(refused, 422)


async def test_only_subscriptions_can_be_written(fhir: Fhir) -> None:
    headers = {**ALL, **FHIR_JSON_BODY}
    for method, path in [
        ("POST", "/fhir/Patient"),
        ("PUT", "/fhir/Patient/123"),
        ("DELETE", "/fhir/Patient/123"),
    ]:
        response = await fhir.client.request(method, path, json=patient("123"), headers=headers)
        assert "Patient is read-only" in outcome(response, 405)
        assert response.headers["allow"] == "GET, HEAD"
    patch = await fhir.client.patch("/fhir/Subscription/x", headers=headers)
    assert "PATCH is not supported" in outcome(patch, 405)
    mismatch = await fhir.client.put("/fhir/Subscription/a", json=subscription_body(id="b"), headers=headers)
    assert "the URL says 'a'" in outcome(mismatch, 400)
