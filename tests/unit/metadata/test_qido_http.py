"""QIDO-RS over HTTP against the embedded store."""

import pytest

from lucerna.events.v1.events_pb2 import AuditRecord
from tests.unit.metadata.dicomweb_testkit import BASE_URL, Env

pytestmark = pytest.mark.unit

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
RETRIEVE_URL = "00081190"


def _values(results: list[dict], tag: str) -> list:  # type: ignore[type-arg]
    return [(r.get(tag, {}).get("Value") or [None])[0] for r in results]


async def _search(env: Env, path: str, **params: object) -> list[dict]:  # type: ignore[type-arg]
    response = await env.client.get(f"/dicom-web{path}", params=params)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    return response.json()  # type: ignore[no-any-return]


async def test_all_studies_with_their_retrieve_urls(env: Env) -> None:
    studies = await _search(env, "/studies")
    uids = {env.records[n].study_uid for n in ("a1-1", "b", "CT_small.dcm", "SC_rgb_rle_2frame.dcm")}
    assert uids <= set(_values(studies, STUDY_UID))
    for study in studies:
        uid = study[STUDY_UID]["Value"][0]
        assert study[RETRIEVE_URL] == {"vr": "UR", "Value": [f"{BASE_URL}/dicom-web/studies/{uid}"]}


async def test_study_aggregates(env: Env) -> None:
    [study] = await _search(env, "/studies", StudyInstanceUID=env.records["a1-1"].study_uid)
    assert study["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries
    assert study["00201208"]["Value"] == [5]  # NumberOfStudyRelatedInstances
    assert study["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy


async def test_uid_list_matching(env: Env) -> None:
    wanted = [env.records["a1-1"].study_uid, env.records["b"].study_uid]
    for separator in (",", "\\"):
        studies = await _search(env, "/studies", StudyInstanceUID=separator.join(wanted))
        assert sorted(_values(studies, STUDY_UID)) == sorted(wanted)


async def test_patient_name_wildcards_ignore_case(env: Env) -> None:
    assert _values(await _search(env, "/studies", PatientName="smi*"), STUDY_UID) == [
        env.records["b"].study_uid
    ]
    assert _values(await _search(env, "/studies", **{"00100010": "SM?TH^JANE"}), STUDY_UID) == [
        env.records["b"].study_uid
    ]


async def test_patient_id_and_accession_number(env: Env) -> None:
    assert _values(await _search(env, "/studies", PatientID="PID-SMITH"), STUDY_UID) == [
        env.records["b"].study_uid
    ]
    assert _values(await _search(env, "/studies", AccessionNumber="ACC0002"), STUDY_UID) == [
        env.records["b"].study_uid
    ]


async def test_modalities_in_study_and_modality(env: Env) -> None:
    studies = await _search(env, "/studies", ModalitiesInStudy="MR")
    assert _values(studies, STUDY_UID) == [env.records["b"].study_uid]
    both = await _search(env, "/studies", ModalitiesInStudy="MR,OT")
    assert sorted(_values(both, STUDY_UID)) == sorted(
        [env.records["b"].study_uid, env.records["SC_rgb_rle_2frame.dcm"].study_uid]
    )
    series = await _search(env, "/series", Modality="MR")
    assert _values(series, SERIES_UID) == [env.records["b"].series_uid]


async def test_date_ranges(env: Env) -> None:
    def studies(results: list[dict]) -> set[str]:  # type: ignore[type-arg]
        return set(_values(results, STUDY_UID))

    a, b = env.records["a1-1"].study_uid, env.records["b"].study_uid
    assert studies(await _search(env, "/studies", StudyDate="20250101-20251231")) == {b}
    assert {a, b} <= studies(await _search(env, "/studies", StudyDate="20250101-"))
    assert b not in studies(await _search(env, "/studies", StudyDate="20260101-"))
    assert a not in studies(await _search(env, "/studies", StudyDate="-20251231"))
    assert studies(await _search(env, "/studies", StudyDate="20250301", StudyTime="08-0830")) == {b}


async def test_series_and_instances_of_a_study(env: Env) -> None:
    study = env.records["a1-1"].study_uid
    series = await _search(env, f"/studies/{study}/series")
    assert _values(series, "00200011") == [1, 2]
    assert series[0][RETRIEVE_URL]["Value"] == [
        f"{BASE_URL}/dicom-web/studies/{study}/series/{env.records['a1-1'].series_uid}"
    ]
    assert len(await _search(env, f"/studies/{study}/instances")) == 5
    instances = await _search(env, f"/studies/{study}/series/{env.records['a2-1'].series_uid}/instances")
    assert _values(instances, "00200013") == [1, 2]
    record = env.records["a2-1"]
    assert instances[0][RETRIEVE_URL]["Value"] == [
        f"{BASE_URL}/dicom-web/studies/{study}/series/{record.series_uid}/instances/{record.sop_instance_uid}"
    ]


async def test_relational_queries(env: Env) -> None:
    series = await _search(env, "/series", PatientName="DOE^JOHN", SeriesDescription="LUNG*")
    assert _values(series, SERIES_UID) == [env.records["a2-1"].series_uid]
    instances = await _search(env, "/instances", PatientID="PID-SMITH")
    assert _values(instances, SOP_UID) == [env.records["b"].sop_instance_uid]
    assert instances[0][RETRIEVE_URL]["Value"][0].endswith(f"/instances/{env.records['b'].sop_instance_uid}")


async def test_includefield_reads_a_representative_instance(env: Env) -> None:
    [study] = await _search(
        env, "/studies", StudyInstanceUID=env.records["b"].study_uid, includefield=["PatientAge", "00080080"]
    )
    assert study["00101010"] == {"vr": "AS", "Value": ["045Y"]}
    assert study["00080080"]["Value"] == ["LUCERNA GENERAL"]
    [everything] = await _search(
        env, "/studies", StudyInstanceUID=env.records["b"].study_uid, includefield="all"
    )
    assert everything["00101010"]["Value"] == ["045Y"]
    assert "00080080" not in everything  # InstitutionName is a series attribute
    assert SOP_UID not in everything
    [instance] = await _search(
        env, "/instances", SOPInstanceUID=env.records["b"].sop_instance_uid, includefield="all"
    )
    assert instance["00080080"]["Value"] == ["LUCERNA GENERAL"]
    assert "7FE00010" not in instance  # bulk data never travels in QIDO results


async def test_universal_matching_adds_the_attribute(env: Env) -> None:
    [study] = await _search(env, "/studies", StudyInstanceUID=env.records["b"].study_uid, PatientBirthDate="")
    assert study["00100030"]["Value"] == ["19800101"]


async def test_limit_and_offset_page_through_results(env: Env) -> None:
    study = env.records["a1-1"].study_uid
    everything = _values(await _search(env, f"/studies/{study}/instances"), SOP_UID)
    pages = []
    for offset in range(0, 5, 2):
        pages += _values(await _search(env, f"/studies/{study}/instances", limit=2, offset=offset), SOP_UID)
    assert pages == everything
    response = await env.client.get("/dicom-web/studies", params={"limit": 100000})
    assert response.status_code == 200
    assert response.headers["warning"].startswith("299 ")


async def test_no_match_is_an_empty_array(env: Env) -> None:
    response = await env.client.get("/dicom-web/studies", params={"PatientID": "NOBODY"})
    assert (response.status_code, response.json()) == (200, [])


async def test_fuzzy_matching_goes_through_the_search_index(env: Env) -> None:
    from lucerna.metadata.indexing import index_changes  # noqa: PLC0415

    await index_changes(env.resources.metadata, env.resources.search)
    studies = await _search(env, "/studies", PatientName="SMYTH^JANE", fuzzymatching="true")
    assert _values(studies, STUDY_UID) == [env.records["b"].study_uid]
    assert await _search(env, "/studies", PatientName="SMYTH^JANE") == []
    assert await _search(env, "/studies", PatientName="QWERTYUIOP", fuzzymatching="true") == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"Bogus": "1"}, "unknown query parameter 'Bogus'"),
        ({"PatientWeight": "70"}, "is not supported as a matching key at the study level"),
        ({"StudyDate": "2026-01-01"}, "is not a date"),
        ({"StudyDate": "20260230"}, "not a valid date"),
        ({"limit": "x"}, "limit: 'x' is not an integer"),
        ({"StudyInstanceUID": "1.2.abc"}, "is not a valid UID"),
    ],
)
async def test_bad_queries_are_400_with_the_reason(env: Env, params: dict[str, str], message: str) -> None:
    response = await env.client.get("/dicom-web/studies", params=params)
    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_accept_negotiation(env: Env) -> None:
    for accept in ("application/dicom+json", "application/json", "*/*"):
        response = await env.client.get("/dicom-web/studies", headers={"Accept": accept})
        assert response.status_code == 200
    assert (
        (await env.client.get("/dicom-web/studies", headers={"Accept": "application/json"}))
        .headers["content-type"]
        .startswith("application/json")
    )
    refused = await env.client.get("/dicom-web/studies", headers={"Accept": "application/dicom+xml"})
    assert refused.status_code == 406
    assert "application/dicom+json" in refused.json()["error"]


async def test_each_search_is_audited(env: Env) -> None:
    before = len(env.audits)
    study = env.records["b"].study_uid
    await _search(env, "/studies", PatientName="SMITH*", StudyInstanceUID=study)
    [*_, envelope] = await env.wait_for_audits(before + 1)
    assert envelope.routing_key == "audit.record"
    record = AuditRecord.FromString(envelope.body)
    assert record.action == AuditRecord.PATIENT_DATA_READ
    assert (record.service, record.actor, record.study_instance_uid) == ("metadata", "local", study)
    assert record.details["route"] == "/dicom-web/studies"
    assert "SMITH" not in record.details["query"]  # PHI is hashed, never in clear
    assert "PatientName=sha256%3A" in record.details["query"]
    assert f"StudyInstanceUID={study}" in record.details["query"]
    patient_id = env.records["b"].attributes["PatientID"]  # read back from the study's row
    assert patient_id and record.dicom_patient.patient_id == patient_id
    assert patient_id not in str(dict(record.details))
