"""Publishing an InferenceCompleted as FHIR R4B resources and one transaction Bundle."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from lucerna.events.v1 import events_pb2
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.publishing import (
    Publication,
    PublishingError,
    PublishingSettings,
    StudyFacts,
    publication,
    resource_id,
)
from tests.unit.fhir.kit import (
    INSTANCE_SET,
    SETTINGS,
    STUDY,
    WEIGHTS,
    completed,
    nodule,
    sop,
    study_facts,
    study_ready,
    two_nodules,
)

pytestmark = pytest.mark.unit

AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}


def as_json(resource: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resource.model_dump_json())
    return data


@pytest.fixture
def published() -> Publication:
    return publication(two_nodules(), study_facts(), SETTINGS)


def test_bundle_is_a_put_transaction_of_every_resource(published: Publication) -> None:
    bundle = as_json(published.bundle)
    assert bundle["type"] == "transaction"
    kinds = [entry["resource"]["resourceType"] for entry in bundle["entry"]]
    assert kinds == [
        "Endpoint",
        "Patient",
        "ImagingStudy",
        "Device",
        "Device",
        "Observation",
        "Observation",
        "DiagnosticReport",
        "Provenance",
    ]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
        assert entry["fullUrl"] == f"urn:uuid:{resource['id'][:8]}-{resource['id'][8:12]}-" + (
            f"{resource['id'][12:16]}-{resource['id'][16:20]}-{resource['id'][20:]}"
        )
    assert len({entry["fullUrl"] for entry in bundle["entry"]}) == len(bundle["entry"])
    Bundle.model_validate_json(published.bundle.model_dump_json())


def references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [ref for value in node.values() for ref in references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    return []


def test_every_reference_resolves_within_the_bundle(published: Publication) -> None:
    bundle = as_json(published.bundle)
    urls = {entry["request"]["url"] for entry in bundle["entry"]}
    refs = references([entry["resource"] for entry in bundle["entry"]])
    assert len(refs) > 10
    assert set(refs) <= urls


def test_every_resource_round_trips_through_r4b(published: Publication) -> None:
    for entry in published.entries:
        text = entry.resource.model_dump_json()
        model = get_fhir_model_class(entry.resource.get_resource_type())
        again = model.model_validate_json(text)
        assert again.model_dump_json() == text
        assert model.model_validate(json.loads(text)).model_dump_json() == text
        assert canonical_sha256(json.loads(text)) == entry.sha256


def test_redelivery_yields_identical_resources(published: Publication) -> None:
    again = publication(two_nodules(), study_facts(), SETTINGS)
    assert again.bundle.model_dump_json() == published.bundle.model_dump_json()
    assert [e.sha256 for e in again.entries] == [e.sha256 for e in published.entries]


def test_ids_derive_from_stable_keys(published: Publication) -> None:
    assert published.patient.id == resource_id("Patient", "urn:lucerna:patient-id", "MRN-0042")
    assert published.imaging_study.id == resource_id("ImagingStudy", STUDY)
    assert published.model_device.id == resource_id("Device", "lung-nodule-detector", "1.2.0", WEIGHTS)
    assert [o.id for o in published.observations] == [
        resource_id("Observation", "job-7f3a", "1"),
        resource_id("Observation", "job-7f3a", "2"),
    ]
    assert published.report.id == resource_id("DiagnosticReport", "job-7f3a")
    assert published.provenance.id == resource_id("Provenance", "job-7f3a")
    assert len(str(published.report.id)) == 32
    other_job = publication(completed(nodule(0.93, 21.6, 2), job_id="job-other"), study_facts(), SETTINGS)
    assert other_job.report.id != published.report.id
    assert other_job.patient.id == published.patient.id
    assert other_job.model_device.id == published.model_device.id


def test_conditional_create_identifiers(published: Publication) -> None:
    queries = {
        entry.reference.split("/")[0] + str(i): entry.if_none_exist
        for i, entry in enumerate(published.entries)
    }
    assert queries == {
        "Endpoint0": "identifier=urn:lucerna:dicomweb-endpoint|http://127.0.0.1:8080/dicom-web",
        "Patient1": "identifier=urn:lucerna:patient-id|MRN-0042",
        "ImagingStudy2": f"identifier=urn:dicom:uid|urn:oid:{STUDY}",
        "Device3": f"identifier=urn:lucerna:model|lung-nodule-detector%5C%7C1.2.0%5C%7C{WEIGHTS}",
        "Device4": "identifier=urn:lucerna:platform|Lucerna",
        "Observation5": "identifier=urn:lucerna:job|job-7f3a/1",
        "Observation6": "identifier=urn:lucerna:job|job-7f3a/2",
        "DiagnosticReport7": "identifier=urn:lucerna:job|job-7f3a",
        "Provenance8": f"target=DiagnosticReport/{published.report.id}",
    }


def test_aiast_on_ai_asserted_resources_only(published: Publication) -> None:
    for resource in (*published.observations, published.report):
        assert as_json(resource)["meta"]["security"] == [AIAST]
    for resource in (
        published.patient,
        published.imaging_study,
        published.model_device,
        published.platform_device,
        published.endpoint,
        published.provenance,
    ):
        assert "meta" not in as_json(resource)


def test_observation_content(published: Publication) -> None:
    obs = as_json(published.observations[0])
    study_ref = f"ImagingStudy/{published.imaging_study.id}"
    assert obs["status"] == "preliminary"
    assert obs["identifier"] == [{"system": "urn:lucerna:job", "value": "job-7f3a/1"}]
    assert obs["code"] == {
        "coding": [{"system": "http://snomed.info/sct", "code": "786838002", "display": "Pulmonary nodule"}],
        "text": "Pulmonary nodule",
    }
    assert obs["category"][0]["coding"][0]["code"] == "imaging"
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == "52101004"
    assert obs["bodySite"]["coding"] == [
        {"system": "http://snomed.info/sct", "code": "39607008", "display": "Lung structure"}
    ]
    assert obs["subject"] == {"reference": f"Patient/{published.patient.id}"}
    assert obs["device"] == {"reference": f"Device/{published.model_device.id}"}
    assert obs["derivedFrom"] == [{"reference": study_ref}]
    assert obs["effectiveDateTime"] == "2026-11-21T09:30:05Z"
    probability, diameter = obs["component"]
    assert probability["code"]["coding"][0]["code"] == "probability"
    # The event's float32 0.93, not its float64 expansion 0.9300000071525574.
    assert probability["valueQuantity"] == {
        "value": 0.93,
        "unit": "1",
        "system": "http://unitsofmeasure.org",
        "code": "1",
    }
    assert diameter["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "81827009",
        "display": "Diameter",
    }
    assert diameter["valueQuantity"] == {
        "value": 21.6,
        "unit": "mm",
        "system": "http://unitsofmeasure.org",
        "code": "mm",
    }
    (location,) = obs["extension"]
    assert location == {
        "url": "urn:lucerna:fhir:extension:image-location",
        "extension": [
            {"url": "sopInstanceUid", "valueId": sop(2)},
            {"url": "frameNumber", "valuePositiveInt": 1},
            {"url": "xMin", "valueDecimal": 100.5},
            {"url": "yMin", "valueDecimal": 80.25},
            {"url": "xMax", "valueDecimal": 122.1},
            {"url": "yMax", "valueDecimal": 101.7},
        ],
    }


def test_report_content(published: Publication) -> None:
    report = as_json(published.report)
    assert report["status"] == "preliminary"
    assert report["identifier"] == [
        {"system": "urn:lucerna:job", "value": "job-7f3a"},
        {"system": "urn:lucerna:result", "value": "result-19"},
    ]
    assert report["category"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
        "code": "RAD",
        "display": "Radiology",
    }
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert report["subject"] == {"reference": f"Patient/{published.patient.id}"}
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{published.imaging_study.id}"}]
    assert report["result"] == [{"reference": f"Observation/{o.id}"} for o in published.observations]
    assert report["conclusion"] == (
        "Pulmonary nodule: 2 found (largest diameter 21.6 mm). AI result, not reviewed by a radiologist."
    )
    assert [c["coding"][0]["code"] for c in report["conclusionCode"]] == ["786838002"]
    assert report["issued"] == report["effectiveDateTime"] == "2026-11-21T09:30:05Z"
    assert "performer" not in report
    assert "resultsInterpreter" not in report
    (form,) = report["presentedForm"]
    page = base64.b64decode(form["data"]).decode()
    assert form["contentType"] == "text/html"
    assert form["size"] == len(page.encode())
    assert page.count("<tr>") == 3  # header and two findings
    assert "21.6 mm" in page
    assert sop(2) in page


def test_html_escapes_every_value() -> None:
    hostile = nodule(0.9, 5.0, 1, display='<script>alert("x")</script> & co')
    report = as_json(publication(completed(hostile), study_facts(), SETTINGS).report)
    page = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page


def test_no_finding() -> None:
    published = publication(completed(), study_facts(), SETTINGS)
    report = as_json(published.report)
    assert published.observations == ()
    assert "result" not in report
    assert "conclusionCode" not in report
    assert report["conclusion"] == (
        "No finding above the model's operating threshold. AI result, not reviewed by a radiologist."
    )
    assert as_json(published.provenance)["target"] == [
        {"reference": f"DiagnosticReport/{published.report.id}"}
    ]
    Bundle.model_validate_json(published.bundle.model_dump_json())
    assert "<table>" not in base64.b64decode(report["presentedForm"][0]["data"]).decode()


def test_device(published: Publication) -> None:
    device = as_json(published.model_device)
    assert device["identifier"] == [
        {"system": "urn:lucerna:model", "value": f"lung-nodule-detector|1.2.0|{WEIGHTS}"},
        {"system": "urn:lucerna:model-weights-sha256", "value": WEIGHTS},
    ]
    assert device["deviceName"] == [{"name": "lung-nodule-detector", "type": "model-name"}]
    assert device["version"] == [{"value": "1.2.0"}]
    assert device["type"] == {"text": "AI algorithm"}
    assert device["manufacturer"] == "Lucerna"


def test_provenance(published: Publication) -> None:
    provenance = as_json(published.provenance)
    assert provenance["target"] == [
        {"reference": f"DiagnosticReport/{published.report.id}"},
        *({"reference": f"Observation/{o.id}"} for o in published.observations),
    ]
    assert provenance["recorded"] == "2026-11-21T09:30:05Z"
    assert provenance["activity"]["coding"][0]["code"] == "CREATE"
    model_agent, platform_agent = provenance["agent"]
    assert model_agent["type"]["coding"][0]["code"] == "performer"
    assert model_agent["who"] == {"reference": f"Device/{published.model_device.id}"}
    assert platform_agent["type"]["coding"][0]["code"] == "assembler"
    assert platform_agent["who"] == {"reference": f"Device/{published.platform_device.id}"}
    (entity,) = provenance["entity"]
    assert entity["role"] == "source"
    assert entity["what"]["reference"] == f"ImagingStudy/{published.imaging_study.id}"
    assert entity["extension"] == [
        {"url": "urn:lucerna:fhir:extension:instance-set-sha256", "valueString": INSTANCE_SET}
    ]


def test_imaging_study_and_patient_from_study_ready(published: Publication) -> None:
    study = as_json(published.imaging_study)
    assert study["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}]
    assert study["status"] == "available"
    assert study["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]
    assert study["numberOfSeries"] == 1
    assert study["numberOfInstances"] == 3
    (series,) = study["series"]
    assert series["bodySite"]["code"] == "51185008"
    assert [i["uid"] for i in series["instance"]] == [sop(1), sop(2), sop(3)]
    assert series["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
    }
    assert study["endpoint"] == [{"reference": f"Endpoint/{published.endpoint.id}"}]
    endpoint = as_json(published.endpoint)
    assert endpoint["address"] == "http://127.0.0.1:8080/dicom-web"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    patient = as_json(published.patient)
    assert patient["identifier"] == [
        {"use": "usual", "system": "urn:lucerna:patient-id", "value": "MRN-0042"}
    ]
    assert "name" not in patient


def test_optional_study_facts() -> None:
    facts = StudyFacts(
        **{
            **study_facts().__dict__,
            "patient_name": "Doe^Jane^Q",
            "issuer_of_patient_id": "HOSP A",
            "started": datetime(2026, 11, 21, 8, 0, tzinfo=UTC),
            "accession_number": "ACC-1",
        }
    )
    published = publication(
        two_nodules(), facts, PublishingSettings(issuer_systems={"HOSP A": "urn:oid:1.2.3"})
    )
    patient = as_json(published.patient)
    assert patient["identifier"][0] == {
        "use": "usual",
        "system": "urn:oid:1.2.3",
        "value": "MRN-0042",
        "assigner": {"display": "HOSP A"},
    }
    assert patient["name"] == [{"text": "Jane Q Doe", "family": "Doe", "given": ["Jane", "Q"]}]
    study = as_json(published.imaging_study)
    assert study["started"] == "2026-11-21T08:00:00Z"
    assert study["identifier"][1]["value"] == "ACC-1"
    assert published.patient.id == resource_id("Patient", "urn:oid:1.2.3", "MRN-0042")
    unmapped = publication(two_nodules(), facts, SETTINGS)
    assert as_json(unmapped.patient)["identifier"][0]["system"] == "urn:lucerna:patient-id:HOSP%20A"


def bad(**changes: Any) -> events_pb2.InferenceCompleted:
    event = two_nodules()
    for name, value in changes.items():
        setattr(event, name, value)
    return event


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (bad(job_id=""), "lacks job_id"),
        (bad(weights_sha256="", model_version=""), "lacks model_version, weights_sha256"),
        (bad(study_instance_uid="1.2.3"), "result of study 1.2.3 given facts of study"),
        (bad(patient_id="OTHER"), "result for PatientID 'OTHER'"),
        (
            completed(events_pb2.Finding(code_system="http://snomed.info/sct", probability=0.9)),
            "finding 1 of job job-7f3a has no code",
        ),
        (completed(nodule(1.5, 3.0, 1)), "probability 1.5, not in"),
        (completed(nodule(float("nan"), 3.0, 1)), "probability nan"),
    ],
)
def test_invalid_content_is_refused_precisely(event: events_pb2.InferenceCompleted, message: str) -> None:
    with pytest.raises(PublishingError, match=message):
        publication(event, study_facts(), SETTINGS)


def test_missing_completed_at_is_refused() -> None:
    event = two_nodules()
    event.ClearField("completed_at")
    with pytest.raises(PublishingError, match="completed_at"):
        publication(event, study_facts(), SETTINGS)


def test_bad_location_and_measurement_are_refused() -> None:
    finding = nodule(0.9, 5.0, 1)
    finding.locations[0].frame = 0
    with pytest.raises(PublishingError, match="1-based frame"):
        publication(completed(finding), study_facts(), SETTINGS)
    finding = nodule(0.9, 5.0, 1)
    finding.locations[0].x_max = 1.0
    with pytest.raises(PublishingError, match=r"is not \(x_min, y_min, x_max, y_max\) in order"):
        publication(completed(finding), study_facts(), SETTINGS)
    finding = nodule(0.9, 5.0, 1)
    finding.measurements[0].unit = ""
    with pytest.raises(PublishingError, match="UCUM unit"):
        publication(completed(finding), study_facts(), SETTINGS)


def test_schema_violation_names_the_resource() -> None:
    finding = nodule(0.9, 5.0, 1)
    finding.locations[0].sop_instance_uid = "not a uid!"  # an FHIR id admits no space
    with pytest.raises(PublishingError, match="invalid Observation"):
        publication(completed(finding), study_facts(), SETTINGS)


def test_study_without_patient_id_is_refused() -> None:
    facts = StudyFacts(**{**study_facts().__dict__, "patient_id": ""})
    with pytest.raises(PublishingError, match="has no PatientID"):
        publication(bad(patient_id=""), facts, SETTINGS)


def test_settings_refuse_a_non_http_dicomweb_url() -> None:
    with pytest.raises(ValueError, match="http"):
        PublishingSettings(dicomweb_base_url="ftp://pacs/dicom-web")


def test_study_header_values_reach_the_patient_and_imaging_study() -> None:
    ready = study_ready()
    ready.patient_name = "DOE^JANE"
    ready.issuer_of_patient_id = "HOSP A"
    ready.accession_number = "ACC-77"
    ready.study_date, ready.study_time, ready.timezone_offset = "20260917", "101500.25", "+0200"
    facts = StudyFacts.from_study_ready(ready)
    assert facts.started == datetime(2026, 9, 17, 8, 15, 0, 250000, tzinfo=UTC)
    published = as_json(publication(two_nodules(), facts, SETTINGS).imaging_study)
    assert published["started"] == "2026-09-17T10:15:00.250000+02:00"
    ready.timezone_offset = ""
    assert StudyFacts.from_study_ready(ready).started == datetime(2026, 9, 17, 10, 15, 0, 250000, tzinfo=UTC)
    ready.study_time = ""
    assert StudyFacts.from_study_ready(ready).started is None  # a date alone is not a start time
    patient = as_json(publication(two_nodules(), facts, SETTINGS).patient)
    assert patient["name"][0]["family"] == "DOE"
    assert patient["identifier"][0]["system"] == "urn:lucerna:patient-id:HOSP%20A"
