"""Smoke tests for the FHIR peer fixture: an independent FHIR R4 server that takes transactions."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _transaction(patient_id: str, observation_id: str) -> dict[str, Any]:
    patient = {"resourceType": "Patient", "id": patient_id, "name": [{"family": "Doe", "given": ["Jane"]}]}
    observation = {
        "resourceType": "Observation",
        "id": observation_id,
        "status": "final",
        "code": {"text": "pulmonary nodule"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient, "request": {"method": "PUT", "url": f"Patient/{patient_id}"}},
            {"resource": observation, "request": {"method": "PUT", "url": f"Observation/{observation_id}"}},
        ],
    }


def test_transaction_puts_resources_that_read_back(fhir_peer: Any) -> None:
    patient_id, observation_id = f"p-{uuid.uuid4().hex[:12]}", f"o-{uuid.uuid4().hex[:12]}"
    with httpx.Client(base_url=fhir_peer.url, headers=FHIR_JSON, timeout=10) as client:
        assert client.get("/metadata").raise_for_status().json()["fhirVersion"] == "4.0.1"

        answer = client.post("", json=_transaction(patient_id, observation_id)).raise_for_status().json()
        assert answer["type"] == "transaction-response"
        assert [entry["response"]["status"] for entry in answer["entry"]] == ["201 Created", "201 Created"]
        assert [entry["response"]["location"] for entry in answer["entry"]] == [
            f"Patient/{patient_id}/_history/1",
            f"Observation/{observation_id}/_history/1",
        ]
        assert {entry["response"]["etag"] for entry in answer["entry"]} == {'W/"1"'}

        patient = client.get(f"/Patient/{patient_id}").raise_for_status()
        assert patient.headers["ETag"] == 'W/"1"'
        assert patient.json()["name"] == [{"family": "Doe", "given": ["Jane"]}]
        observation = client.get(f"/Observation/{observation_id}").raise_for_status().json()
        assert observation["subject"] == {"reference": f"Patient/{patient_id}"}

        again = client.post("", json=_transaction(patient_id, observation_id)).raise_for_status().json()
        assert [entry["response"]["status"] for entry in again["entry"]] == ["200 OK", "200 OK"]
        assert client.get(f"/Patient/{patient_id}").json()["meta"]["versionId"] == "2"


def test_malformed_bundle_is_refused_with_an_operation_outcome(fhir_peer: Any) -> None:
    with httpx.Client(base_url=fhir_peer.url, headers=FHIR_JSON, timeout=10) as client:
        truncated = client.post("", content=b'{"resourceType": "Bundle", "type": "transaction", "entry": [')
        assert truncated.status_code == 400
        assert truncated.json()["resourceType"] == "OperationOutcome"

        unknown_element = _transaction(f"p-{uuid.uuid4().hex[:12]}", f"o-{uuid.uuid4().hex[:12]}")
        unknown_element["entry"][0]["resource"]["nmae"] = [{"family": "Doe"}]
        assert client.post("", json=unknown_element).status_code == 400


def test_transaction_with_a_dangling_reference_writes_nothing(fhir_peer: Any) -> None:
    patient_id, observation_id = f"p-{uuid.uuid4().hex[:12]}", f"o-{uuid.uuid4().hex[:12]}"
    bundle = _transaction(patient_id, observation_id)
    bundle["entry"][1]["resource"]["subject"] = {"reference": "Patient/nobody"}
    with httpx.Client(base_url=fhir_peer.url, headers=FHIR_JSON, timeout=10) as client:
        refused = client.post("", json=bundle)
        assert refused.status_code == 400
        assert "Patient/nobody" in refused.json()["issue"][0]["diagnostics"]
        assert client.get(f"/Patient/{patient_id}").status_code == 404


def test_failure_switch_refuses_requests_until_ok(fhir_peer: Any) -> None:
    with httpx.Client(base_url=fhir_peer.url, headers=FHIR_JSON, timeout=10) as client:
        fhir_peer.fail(503, count=1, retry_after=2)
        try:
            refused = client.post("", json=_transaction("p-fail", "o-fail"))
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "2"
            assert refused.json()["resourceType"] == "OperationOutcome"
            assert client.post("", json=_transaction("p-fail", "o-fail")).status_code == 200
        finally:
            fhir_peer.ok()
    assert [seen["status"] for seen in fhir_peer.requests()[-2:]] == [503, 200]
