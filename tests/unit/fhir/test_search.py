"""FHIR search: what published resources are indexed by, and query strings parsed into queries."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lucerna.fhir.publishing import Publication, publication
from lucerna.fhir.search import (
    PARAMETERS,
    SearchError,
    Summary,
    date_range,
    index_entries,
    matches,
    params_of,
    parse_search,
)
from lucerna.fhir.store import (
    DateComparator,
    DateCriterion,
    IndexEntries,
    PrefixCriterion,
    SortKey,
    StoredResource,
    TermCriterion,
)
from tests.unit.fhir.kit import SETTINGS, study_facts, two_nodules

pytestmark = pytest.mark.unit

UPDATED = datetime(2026, 11, 21, 10, 0, 0, 123000, tzinfo=UTC)


@pytest.fixture(scope="module")
def published() -> Publication:
    return publication(two_nodules(), study_facts(), SETTINGS)


def indexed(resource: Any) -> tuple[dict[str, Any], IndexEntries]:
    data: dict[str, Any] = json.loads(resource.model_dump_json())
    stored = StoredResource(data["resourceType"], data["id"], 1, UPDATED, "0" * 64, b"{}")
    return data, index_entries(stored, data)


def found(entries: IndexEntries, resource_type: str, query: str) -> bool:
    pairs = [tuple(part.split("=", 1)) for part in query.split("&")]
    request = parse_search(resource_type, [(k, v) for k, v in pairs], strict=True)
    return all(matches(entries, criterion) for criterion in request.query.criteria)


def test_report_is_found_by_what_integrators_search(published: Publication) -> None:
    report, entries = indexed(published.report)
    patient = published.patient.id
    study = published.imaging_study.id
    observation = published.observations[0].id
    assert found(entries, "DiagnosticReport", f"patient={patient}")
    assert found(entries, "DiagnosticReport", f"patient=Patient/{patient}")
    assert found(entries, "DiagnosticReport", f"subject={patient}")
    assert found(entries, "DiagnosticReport", f"subject:Patient={patient}")
    assert found(entries, "DiagnosticReport", f"subject=http://example.org/fhir/Patient/{patient}")
    assert found(entries, "DiagnosticReport", "code=http://loinc.org|18748-4")
    assert found(entries, "DiagnosticReport", "code=18748-4")
    assert found(entries, "DiagnosticReport", "code=http://loinc.org|")
    assert not found(entries, "DiagnosticReport", "code=|18748-4")
    assert found(entries, "DiagnosticReport", "status=preliminary")
    assert found(entries, "DiagnosticReport", "status=final,preliminary")
    assert not found(entries, "DiagnosticReport", "status=final")
    assert found(entries, "DiagnosticReport", "status:not=final")
    assert found(entries, "DiagnosticReport", f"result=Observation/{observation}")
    assert found(entries, "DiagnosticReport", f"imaging-study={study}")
    assert found(entries, "DiagnosticReport", f"_id={report['id']}")
    assert found(entries, "DiagnosticReport", "_security=AIAST")
    assert found(entries, "DiagnosticReport", f"_lastUpdated=gt2026-11-20&_lastUpdated=lt{UPDATED.year + 1}")
    job_identifier = next(i for i in report["identifier"] if i["system"] == "urn:lucerna:job")
    assert found(entries, "DiagnosticReport", f"identifier=urn:lucerna:job|{job_identifier['value']}")
    assert not found(entries, "DiagnosticReport", f"patient=other&code=18748-4&_id={report['id']}")


def test_report_date_prefixes_follow_r4_range_semantics(published: Publication) -> None:
    report, entries = indexed(published.report)
    day = report["effectiveDateTime"][:10]
    when = datetime.fromisoformat(report["effectiveDateTime"])
    before = (when - timedelta(days=1)).date().isoformat()
    after = (when + timedelta(days=1)).date().isoformat()
    for query, expected in [
        (f"date={day}", True),
        (f"date=eq{day}", True),
        (f"date=ne{day}", False),
        (f"date=gt{before}", True),
        (f"date=gt{day}", False),
        (f"date=ge{day}", True),
        (f"date=lt{after}", True),
        (f"date=lt{day}", False),
        (f"date=le{day}", True),
        (f"date=sa{before}", True),
        (f"date=eb{after}", True),
        (f"date=eb{day}", False),
        (f"date={day[:4]}", True),
        (f"date={day[:7]}", True),
    ]:
        assert found(entries, "DiagnosticReport", query) is expected, query


def test_imaging_study_answers_the_design_notes_example(published: Publication) -> None:
    _, entries = indexed(published.imaging_study)
    patient = published.patient.id
    assert found(entries, "ImagingStudy", f"patient={patient}&modality=CT&_lastUpdated=gt2023-09-01")
    assert not found(entries, "ImagingStudy", f"patient={patient}&modality=MR")
    uid = study_facts().study_instance_uid
    assert found(entries, "ImagingStudy", f"identifier=urn:dicom:uid|urn:oid:{uid}")


def test_observation_provenance_patient_and_device_parameters(published: Publication) -> None:
    observation = published.observations[0]
    _, entries = indexed(observation)
    assert found(entries, "Observation", f"derived-from=ImagingStudy/{published.imaging_study.id}")
    assert found(entries, "Observation", f"device={published.model_device.id}")
    _, entries = indexed(published.provenance)
    assert found(entries, "Provenance", f"target=DiagnosticReport/{published.report.id}")
    assert found(entries, "Provenance", f"target={observation.id}")
    assert found(entries, "Provenance", f"entity={published.imaging_study.id}")
    _, entries = indexed(published.patient)
    identifier = published.patient.identifier[0]
    assert found(entries, "Patient", f"identifier={identifier.system}|{identifier.value}")
    assert found(entries, "Patient", f"identifier={identifier.value}")
    _, entries = indexed(published.model_device)
    assert found(entries, "Device", "device-name=lung")


def test_escaped_bar_in_a_token_is_part_of_the_code() -> None:
    query = parse_search("Device", [("identifier", r"urn:lucerna:model|detector\|1.0\|abc")]).query
    assert query.criteria == (TermCriterion(("identifier|urn:lucerna:model|detector|1.0|abc",)),)
    query = parse_search("Patient", [("identifier", r"a\,b,c")]).query
    assert query.criteria == (TermCriterion(("identifier:code|a,b", "identifier:code|c")),)


def test_string_search_is_a_case_and_accent_insensitive_prefix() -> None:
    stored = StoredResource("Patient", "p", 1, UPDATED, "", b"{}")
    patient = {"resourceType": "Patient", "name": [{"family": "Müller", "given": ["Ana"]}]}
    entries = index_entries(stored, patient)
    assert matches(entries, PrefixCriterion(("family|mul",)))

    def hit(name: str, value: str) -> bool:
        return all(matches(entries, c) for c in parse_search("Patient", [(name, value)]).query.criteria)

    assert hit("name", "MÜLL")
    assert hit("given", "an")
    assert not hit("name:exact", "Mul")
    assert hit("name:exact", "Müller")


def test_result_parameters_shape_the_request() -> None:
    request = parse_search(
        "DiagnosticReport",
        [
            ("_count", "5"),
            ("_offset", "10"),
            ("_sort", "-date,_id"),
            ("_include", "DiagnosticReport:result"),
            ("_include", "DiagnosticReport:subject:Patient"),
            ("_revinclude", "Provenance:target"),
            ("_elements", "status,code"),
            ("_total", "none"),
        ],
    )
    assert request.query.count == 5
    assert request.query.offset == 10
    assert request.query.sort == (SortKey("date", descending=True), SortKey("_id"))
    includes = ["DiagnosticReport:result", "DiagnosticReport:subject:Patient"]
    assert [str(i) for i in request.includes] == includes
    assert [str(i) for i in request.revincludes] == ["Provenance:target"]
    assert request.elements == ("status", "code")
    assert request.query.with_total is False
    counted = parse_search("Observation", [("_summary", "count"), ("_total", "none")])
    assert counted.summary is Summary.COUNT
    assert counted.query.count == 0
    assert counted.query.with_total is True


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([("_count", "many")], "_count must be a whole number"),
        ([("_count", "5000")], "_count must be between 0 and 1000"),
        ([("date", "gt2023-13")], "is not a date"),
        ([("date", "ap2023")], "ap is not supported"),
        ([("_sort", "status")], "cannot sort by 'status'"),
        ([("_summary", "some")], "_summary must be one of"),
        ([("patient", "Observation/1")], "refers to Patient, not Observation"),
        ([("status", "")], "has an empty value"),
    ],
)
def test_bad_values_are_refused_with_the_parameter_named(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(SearchError, match=message):
        parse_search("DiagnosticReport", params)


def test_unknown_parameters_are_ignored_when_lenient_and_refused_when_strict() -> None:
    params = [("status", "final"), ("colour", "blue"), ("code:text", "chest"), ("_include", "Patient:link")]
    lenient = parse_search("DiagnosticReport", params)
    assert lenient.ignored == ("colour", "code:text", "_include")
    assert lenient.used == (("status", "final"),)
    for bad in params[1:]:
        with pytest.raises(SearchError):
            parse_search("DiagnosticReport", [bad], strict=True)
    with pytest.raises(SearchError, match="cannot be searched"):
        parse_search("Medication", [])


def test_revinclude_must_point_at_the_searched_type() -> None:
    assert parse_search("DiagnosticReport", [("_revinclude", "Provenance:target")]).revincludes
    with pytest.raises(SearchError):
        parse_search("Patient", [("_revinclude", "Provenance:target")], strict=True)


def test_date_ranges_have_the_precision_of_the_value() -> None:
    assert date_range("2023") == (datetime(2023, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, tzinfo=UTC))
    assert date_range("2023-12") == (datetime(2023, 12, 1, tzinfo=UTC), datetime(2024, 1, 1, tzinfo=UTC))
    start, end = date_range("2023-09-01T10:00:00+02:00")
    assert start == datetime(2023, 9, 1, 8, 0, tzinfo=UTC)
    assert end - start == timedelta(seconds=1)
    start, end = date_range("2023-09-01T10:00:00.25Z")
    assert end - start == timedelta(milliseconds=10)
    with pytest.raises(ValueError, match="not a FHIR date"):
        date_range("01/09/2023")


def test_every_parameter_is_indexed_under_its_own_name() -> None:
    for resource_type in PARAMETERS:
        names = set(params_of(resource_type))
        assert {"_id", "_lastUpdated"} <= names
    criterion = parse_search("DiagnosticReport", [("issued", "le2030")]).query.criteria[0]
    assert isinstance(criterion, DateCriterion)
    assert criterion.comparisons[0].comparator is DateComparator.LE
