"""A study sent to `lucerna up` ends as FHIR resources that a hospital system reads and searches at
/fhir: the report, its findings, the imaging study, the patient, the algorithm and the provenance."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.parameters import Parameters

from lucerna.audit import merkle
from lucerna.audit.checkpoints import verify
from lucerna.audit.keys import Keyring, parse_public_keys
from lucerna.audit.verify import VerificationError, verify_bundle
from lucerna.fhir import codes, subscriptions
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.publishing import resource_id
from lucerna.inference import synthetic
from tests.e2e.platform import LucernaProcess

BOUNDARY = "lucerna-fhir-e2e"
LOINC_IMAGING = "http://loinc.org|18748-4"


def platform_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """On the real servers, the audit log's checkpoints are anchored on the session's Fabric network
    through the anchor service, under an origin of this run's own (the ledger outlives the log)."""
    if request.param != "servers":
        return {}
    anchor = request.getfixturevalue("anchor_service")
    return {
        "LUCERNA_AUDIT_ANCHOR_TARGET": anchor.address,
        "LUCERNA_AUDIT_ANCHOR_TOKEN": anchor.token,
        "LUCERNA_AUDIT_ORIGIN": f"lucerna.test/e2e-fhir-results-{time.time_ns()}",
    }


def stow(platform: LucernaProcess, instances: list[bytes]) -> None:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in instances
    )
    response = httpx.post(
        f"{platform.dicomweb}/studies",
        content=body + f"--{BOUNDARY}--\r\n".encode(),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def fhir(platform: LucernaProcess, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{platform.base_url}/fhir/{path}", params=params, timeout=10)


def searchset(platform: LucernaProcess, path: str, **params: Any) -> Bundle:
    response = fhir(platform, path, **params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return Bundle.model_validate_json(response.content)


async def report_for(platform: LucernaProcess, study_uid: str, within: float = 180) -> DiagnosticReport:
    """The study's DiagnosticReport once it can be found by its ImagingStudy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        studies = await asyncio.to_thread(
            searchset, platform, "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}"
        )
        if studies.entry:
            study_id = studies.entry[0].resource.id
            reports = await asyncio.to_thread(
                searchset, platform, "DiagnosticReport", **{"imaging-study": study_id}
            )
            if reports.entry:
                return DiagnosticReport.model_validate(reports.entry[0].resource.model_dump())
        await asyncio.sleep(0.2)
    raise AssertionError(f"no DiagnosticReport for {study_uid} after {within}s\n{platform.log_tail()}")


@pytest.fixture(scope="module")
def chest(platform: LucernaProcess) -> synthetic.SyntheticStudy:
    """A chest CT with nodules, sent once per platform."""
    study = synthetic.chest_study(seed=11, slices=40, patient_id="E2E-FHIR-11")
    stow(platform, study.instances)
    return study


async def test_a_chest_ct_becomes_a_searchable_diagnostic_report(
    platform: LucernaProcess, chest: synthetic.SyntheticStudy
) -> None:
    report = await report_for(platform, chest.study_uid)
    assert report.status == "preliminary"
    assert any(label.code == "AIAST" for label in report.meta.security)
    assert report.result, "the phantom's nodules gave no Observation"

    # Read: the same resource, with its version as ETag; a conditional read answers 304.
    read = await asyncio.to_thread(fhir, platform, f"DiagnosticReport/{report.id}")
    assert read.status_code == 200
    assert read.headers["etag"] == f'W/"{report.meta.versionId}"'
    again = await asyncio.to_thread(
        lambda: httpx.get(read.url, headers={"If-None-Match": read.headers["etag"]}, timeout=10)
    )
    assert again.status_code == 304

    # The patient, by the PatientID the modality sent.
    patients = await asyncio.to_thread(searchset, platform, "Patient", identifier="E2E-FHIR-11")
    [patient_entry] = patients.entry
    patient_id = patient_entry.resource.id
    assert report.subject.reference == f"Patient/{patient_id}"

    # Search as an integrator does: patient + code + date, with the findings and provenance.
    today = datetime.now(UTC).date().isoformat()
    found = await asyncio.to_thread(
        searchset,
        platform,
        "DiagnosticReport",
        patient=patient_id,
        code=LOINC_IMAGING,
        date=f"ge{today}",
        _include="DiagnosticReport:result",
        _revinclude="Provenance:target",
    )
    matches = [e.resource for e in found.entry if e.search.mode == "match"]
    included = {
        f"{e.resource.get_resource_type()}/{e.resource.id}" for e in found.entry if e.search.mode == "include"
    }
    assert [r.id for r in matches] == [report.id]
    assert found.total == 1
    assert {ref.reference for ref in report.result} <= included
    provenance = [r for r in (e.resource for e in found.entry) if r.get_resource_type() == "Provenance"]
    assert [p.target[0].reference for p in provenance] == [f"DiagnosticReport/{report.id}"], (
        f"{found.model_dump_json()[:2000]}\n{platform.log_tail()}"
    )

    # The design notes' example.
    studies = await asyncio.to_thread(
        searchset, platform, "ImagingStudy", patient=patient_id, modality="CT", _lastUpdated="gt2023-09-01"
    )
    [study_entry] = studies.entry
    imaging = ImagingStudy.model_validate(study_entry.resource.model_dump())
    assert imaging.numberOfInstances == 40
    dataset = pydicom.dcmread(BytesIO(chest.instances[0]))
    assert imaging.series[0].uid == dataset.SeriesInstanceUID
    assert f"ImagingStudy/{imaging.id}" == report.imagingStudy[0].reference


async def test_errors_are_operation_outcomes_and_the_capability_statement_is_served(
    platform: LucernaProcess,
) -> None:
    missing = await asyncio.to_thread(fhir, platform, "DiagnosticReport/does-not-exist")
    assert missing.status_code == 404
    OperationOutcome.model_validate_json(missing.content)
    bad = await asyncio.to_thread(fhir, platform, "DiagnosticReport", date="gt2023-13")
    assert bad.status_code == 400
    assert "date" in OperationOutcome.model_validate_json(bad.content).issue[0].diagnostics
    metadata = await asyncio.to_thread(fhir, platform, "metadata")
    statement = CapabilityStatement.model_validate_json(metadata.content)
    assert statement.fhirVersion == "4.0.1"
    served = {resource.type for resource in statement.rest[0].resource}
    assert {"DiagnosticReport", "Observation", "ImagingStudy", "Patient", "Device", "Provenance"} <= served


class Receiver:
    """A rest-hook endpoint: an HTTP server in a thread that keeps every notification Bundle."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, kind: str) -> list[Parameters]:
        """The status Parameters of the Bundles received of one type (handshake, event-notification)."""
        statuses = [Parameters.model_validate(bundle["entry"][0]["resource"]) for bundle in self.received]
        return [s for s in statuses if any(p.name == "type" and p.valueCode == kind for p in s.parameter)]


async def test_a_subscriber_is_notified_of_its_patients_report(platform: LucernaProcess) -> None:
    receiver = Receiver()
    patient = resource_id("Patient", codes.DEFAULT_PATIENT_ID_SYSTEM, "E2E-SUB-31")
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "AI reports of one patient",
        "criteria": subscriptions.TOPIC,
        "_criteria": {
            "extension": [
                {"url": subscriptions.FILTER_CRITERIA, "valueString": f"DiagnosticReport?patient={patient}"}
            ]
        },
        "channel": {
            "type": "rest-hook",
            "endpoint": receiver.url,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": subscriptions.PAYLOAD_CONTENT, "valueCode": "id-only"}]},
        },
    }
    created = await asyncio.to_thread(
        httpx.post,
        f"{platform.base_url}/fhir/Subscription",
        json=subscription,
        headers={"Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    subscription_id = created.json()["id"]
    deadline = time.monotonic() + 30
    path = f"Subscription/{subscription_id}"
    while (await asyncio.to_thread(fhir, platform, path)).json()["status"] != "active":
        assert time.monotonic() < deadline, f"no handshake: {receiver.received}"
        await asyncio.sleep(0.2)
    assert receiver.notifications("handshake")

    study = synthetic.chest_study(seed=31, slices=30, patient_id="E2E-SUB-31")
    await asyncio.to_thread(stow, platform, study.instances)
    report = await report_for(platform, study.study_uid)
    deadline = time.monotonic() + 30
    while not receiver.notifications("event-notification"):
        assert time.monotonic() < deadline, "no event notification"
        await asyncio.sleep(0.2)
    [event] = receiver.notifications("event-notification")
    [notification_event] = [p for p in event.parameter if p.name == "notification-event"]
    focus = next(part.valueReference.reference for part in notification_event.part if part.name == "focus")
    assert focus.endswith(f"DiagnosticReport/{report.id}")
    number = next(part.valueString for part in notification_event.part if part.name == "event-number")
    assert number == "1"
    receiver.server.shutdown()


async def test_the_published_report_is_in_the_audit_log_under_a_signed_checkpoint(
    platform: LucernaProcess, chest: synthetic.SyntheticStudy
) -> None:
    report = await report_for(platform, chest.study_uid)
    served = (await asyncio.to_thread(fhir, platform, f"DiagnosticReport/{report.id}")).json()
    job_id = next(i.value for i in report.identifier if i.system == "urn:lucerna:job")
    keys = (await asyncio.to_thread(httpx.get, f"{platform.base_url}/.well-known/lucerna-audit-keys")).json()
    trusted = parse_public_keys(keys["keys"])

    # The publication's audit record, found by its message id, once a signed checkpoint covers it.
    deadline = time.monotonic() + 30
    while True:
        note = await asyncio.to_thread(httpx.get, f"{platform.base_url}/api/audit/checkpoints/latest")
        checkpoint = verify(note.text, trusted, origin=keys["origin"]) if note.status_code == 200 else None
        entry = await asyncio.to_thread(audit_entry, platform, f"audit-result-published:{job_id}")
        if checkpoint is not None and entry is not None and entry["seq"] < checkpoint.size:
            break
        assert time.monotonic() < deadline, "the publication's audit record is not under a checkpoint"
        await asyncio.sleep(0.5)
    assert entry["record"]["sha256"] == canonical_sha256(served)
    for instance in chest.instances:  # each stored instance, by its SOP UID and the SHA-256 of its bytes
        sop = pydicom.dcmread(BytesIO(instance)).SOPInstanceUID
        key = f"instance-stored:{sop}:{hashlib.sha256(instance).hexdigest()}"
        stored = await asyncio.to_thread(audit_entry, platform, key)
        assert stored is not None, key
        assert (stored["record"]["action"], stored["record"]["study_instance_uid"]) == (
            "INSTANCE_STORED",
            chest.study_uid,
        )

    proof = (
        await asyncio.to_thread(
            httpx.get,
            f"{platform.base_url}/api/audit/proofs/inclusion/{entry['seq']}",
            params={"size": checkpoint.size},
        )
    ).json()
    leaf = merkle.leaf_hash(base64.b64decode(entry["data"]))
    merkle.verify_inclusion(
        leaf, entry["seq"], checkpoint.size, [base64.b64decode(n) for n in proof["proof"]], checkpoint.root
    )


def audit_entry(platform: LucernaProcess, key: str) -> dict[str, Any] | None:
    """The audit log entry of an event's message id, or None while there is none."""
    response = httpx.get(f"{platform.base_url}/api/audit/entries", params={"key": key}, timeout=10)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    entry: dict[str, Any] = response.json()
    return entry


async def test_an_auditor_verifies_the_report_online_and_from_an_exported_bundle(
    platform: LucernaProcess, chest: synthetic.SyntheticStudy, tmp_path: Path
) -> None:
    report = await report_for(platform, chest.study_uid)
    keys = tmp_path / "pinned-keys.json"
    published_keys = (
        await asyncio.to_thread(httpx.get, f"{platform.base_url}/.well-known/lucerna-audit-keys")
    ).json()
    keys.write_text(json.dumps(published_keys))
    bundle_path = tmp_path / "bundle.json"

    def lucerna(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lucerna.core.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    deadline = time.monotonic() + 30
    while (exported := await asyncio.to_thread(
        lucerna, "export-proof", report.id, "--out", str(bundle_path), "--base-url", platform.base_url
    )).returncode != 0:  # fmt: skip
        assert "checkpoint yet; try again shortly" in exported.stderr, exported.stderr
        assert time.monotonic() < deadline, exported.stderr
        await asyncio.sleep(0.5)
    online = await asyncio.to_thread(
        lucerna, "verify", report.id, "--keys", str(keys), "--base-url", platform.base_url
    )
    assert online.returncode == 0, online.stderr
    assert f"verified: DiagnosticReport/{report.id}" in online.stdout
    assert "make up the job's instance set" in online.stdout  # down to each stored instance
    offline = await asyncio.to_thread(lucerna, "verify", "--offline", str(bundle_path), "--keys", str(keys))
    assert offline.returncode == 0, offline.stderr
    anchors = (await asyncio.to_thread(httpx.get, f"{platform.base_url}/api/audit/anchors")).json()
    bundle = json.loads(bundle_path.read_text())
    if anchors["enabled"]:
        assert "anchored on Fabric, channel lucerna" in online.stdout, online.stdout
        assert "the anchor read back from the ledger matches" in online.stdout, online.stdout
        assert bundle["anchor"]["block_number"] > 0 and bundle["anchor"]["checkpoint"] == bundle["checkpoint"]
        assert "anchored on Fabric" in offline.stdout and "not read back" in offline.stdout
    else:
        assert bundle["anchor"] is None and "Fabric anchor: none" in online.stdout

    # Any changed byte fails, and the failure names what.
    trusted = parse_public_keys(published_keys["keys"])
    changed = copy.deepcopy(bundle)
    changed["resources"][f"DiagnosticReport/{report.id}"]["conclusion"] += " "
    with pytest.raises(VerificationError, match=f"DiagnosticReport/{report.id}"):
        verify_bundle(changed, trusted)
    changed = copy.deepcopy(bundle)
    observation = next(ref for ref in changed["resources"] if ref.startswith("Observation/"))
    changed["resources"][observation]["status"] = "final"
    with pytest.raises(VerificationError, match=observation):
        verify_bundle(changed, trusted)
    changed = copy.deepcopy(bundle)
    data = bytearray(base64.b64decode(changed["entries"][1]["data"]))
    data[-1] ^= 1
    changed["entries"][1]["data"] = base64.b64encode(bytes(data)).decode()
    with pytest.raises(VerificationError, match="log entry"):
        verify_bundle(changed, trusted)
    changed = copy.deepcopy(bundle)
    lines = changed["checkpoint"].split("\n")
    lines[1] = str(int(lines[1]) + 1)
    changed["checkpoint"] = "\n".join(lines)
    with pytest.raises(VerificationError, match="checkpoint"):
        verify_bundle(changed, trusted)
    with pytest.raises(VerificationError, match="no signature by a trusted key"):
        verify_bundle(bundle, Keyring(tmp_path / "other-keys").trusted_keys())
    changed = copy.deepcopy(bundle)
    stored = next(i for i, e in enumerate(changed["entries"]) if e["key"].startswith("instance-stored:"))
    del changed["entries"][stored]  # an image the job ran over, without its stored record
    with pytest.raises(VerificationError, match="no log entry instance-stored:"):
        verify_bundle(changed, trusted)
    if anchors["enabled"]:
        on_ledger = (
            await asyncio.to_thread(
                httpx.get, f"{platform.base_url}/api/audit/anchors/{bundle['anchor']['size']}/ledger"
            )
        ).json()
        verify_bundle(bundle, trusted, on_ledger=on_ledger)
        changed = copy.deepcopy(bundle)
        changed["anchor"]["block_number"] += 1
        with pytest.raises(VerificationError, match="anchor: the ledger's block_number"):
            verify_bundle(changed, trusted, on_ledger=on_ledger)
        changed = copy.deepcopy(bundle)
        changed["anchor"]["root"] = "00" * 32
        with pytest.raises(VerificationError, match="anchor: the anchored checkpoint is not the one"):
            verify_bundle(changed, trusted)


async def test_a_fhir_read_is_an_auditevent_found_by_patient_with_no_phi_in_the_log(
    platform: LucernaProcess, chest: synthetic.SyntheticStudy
) -> None:
    report = await report_for(platform, chest.study_uid)
    patient = report.subject.reference
    assert (await asyncio.to_thread(fhir, platform, f"DiagnosticReport/{report.id}")).status_code == 200

    # The read's AuditEvent (IHE BALP), found by the patient it disclosed, once the record is appended.
    deadline = time.monotonic() + 30
    while True:
        found = (
            await asyncio.to_thread(fhir, platform, "AuditEvent", patient=patient, subtype="read")
        ).json()
        reads = [
            e["resource"]
            for e in found.get("entry", [])
            if any(
                x.get("what", {}).get("reference") == f"DiagnosticReport/{report.id}"
                for x in e["resource"]["entity"]
            )
        ]
        if reads:
            break
        assert time.monotonic() < deadline, f"no AuditEvent of the read: {found}"
        await asyncio.sleep(0.5)
    event = reads[0]
    assert event["entity"][0]["what"]["reference"] == patient and event["outcome"] == "0"
    seq = next(
        int(x["what"]["identifier"]["value"])
        for x in event["entity"]
        if x["what"].get("identifier", {}).get("system") == "urn:lucerna:audit-log:seq"
    )
    entry = await asyncio.to_thread(
        lambda: httpx.get(f"{platform.base_url}/api/audit/entries/{seq}", timeout=10).json()
    )
    assert patient.split("/")[1].encode() not in base64.b64decode(entry["data"])  # sealed, not in the log
    assert "phi_sha256" in entry["record"]["details"]
