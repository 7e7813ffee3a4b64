"""The contract of the imaging store's ports, run against every adapter.

A test module imports these tests (``from tests.contract.metadata_store import *``) and defines
the fixtures ``store`` and ``other_store`` (two started ``MetadataStore`` adapters on the same,
empty backing database) and ``search`` (a started, empty ``SearchIndex``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lucerna.core.dicom.attributes import STUDY_ATTRIBUTES, TAGS, derive
from lucerna.core.storage.ports import (
    DicomJson,
    InstanceRecord,
    Match,
    MetadataStore,
    PutOutcome,
    Query,
    ReadyStudy,
    SearchIndex,
    StudyPatient,
)

__all__ = [
    "test_a_claim_not_acknowledged_is_claimable_again_after_its_lease",
    "test_a_missed_boundary_ends_the_burst_after_the_maximum_idle_time",
    "test_aggregates_count_series_instances_and_modalities",
    "test_assembly_boundary_and_quiet_period",
    "test_audit_outbox_holds_created_instances_until_cleared",
    "test_batch_outcomes_are_in_order",
    "test_claim_ready_hands_each_burst_out_once_to_concurrent_claimers",
    "test_concurrent_puts_to_one_study_count_every_instance",
    "test_delete_updates_aggregates_and_representative",
    "test_fuzzy_patient_names_through_the_search_index",
    "test_index_outbox_skips_a_study_changed_meanwhile",
    "test_instance_attribute_in_a_study_query_keeps_studies_having_it",
    "test_iter_studies_yields_every_study",
    "test_later_burst_gets_the_next_number_and_its_own_count",
    "test_limit_offset_and_study_order",
    "test_list_instances_order_and_filters",
    "test_match_date_ranges",
    "test_match_exact_and_uids",
    "test_match_modalities_in_study",
    "test_match_wildcards_and_case_insensitive_names",
    "test_ping",
    "test_put_duplicate_and_conflict",
    "test_removed_study_leaves_the_search_index",
    "test_search_free_text",
    "test_search_index_answers_study_queries_as_the_store",
    "test_search_reset_and_replace",
    "test_series_and_instance_queries",
    "test_study_attribute_in_a_series_query_filters_by_parent_study",
    "test_study_response_has_every_study_attribute",
    "test_the_patients_of_studies_for_the_audit",
    "test_unknown_attribute_or_fuzzy_kind_is_refused",
]

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def element(keyword: str, *values: Any) -> dict[str, Any]:
    """A DICOM JSON element by keyword."""
    vr = TAGS[keyword][1]
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": v} for v in values]}
    return {"vr": vr, "Value": list(values)}


def make(
    study: str = "1.2.1",
    series: str = "1.2.1.1",
    sop: str = "1.2.1.1.1",
    *,
    patient: str | None = "Doe^John",
    patient_id: str = "P1",
    study_date: str | None = "20240102",
    description: str = "CHEST CT",
    accession: str = "A1",
    modality: str = "CT",
    series_number: int = 1,
    instance_number: int = 1,
    sop_class: str = CT_IMAGE,
    sha: str = "a",
    source: str = "stow:test",
    received_at: datetime = T0,
) -> InstanceRecord:
    """An instance record with a realistic header."""
    dataset: DicomJson = {
        TAGS["SOPClassUID"][0]: element("SOPClassUID", sop_class),
        TAGS["SOPInstanceUID"][0]: element("SOPInstanceUID", sop),
        TAGS["AccessionNumber"][0]: element("AccessionNumber", accession),
        TAGS["Modality"][0]: element("Modality", modality),
        TAGS["StudyDescription"][0]: element("StudyDescription", description),
        TAGS["PatientID"][0]: element("PatientID", patient_id),
        TAGS["PatientSex"][0]: {"vr": "CS"},
        TAGS["StudyInstanceUID"][0]: element("StudyInstanceUID", study),
        TAGS["SeriesInstanceUID"][0]: element("SeriesInstanceUID", series),
        TAGS["SeriesNumber"][0]: element("SeriesNumber", series_number),
        TAGS["InstanceNumber"][0]: element("InstanceNumber", instance_number),
        TAGS["Rows"][0]: element("Rows", 512),
        "7FE00010": {"vr": "OW"},
    }
    if patient is not None:
        dataset[TAGS["PatientName"][0]] = element("PatientName", patient)
    if study_date is not None:
        dataset[TAGS["StudyDate"][0]] = element("StudyDate", study_date)
    return InstanceRecord(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        sha256=sha * 64,
        size=1000,
        source=source,
        received_at=received_at,
        dataset=dict(sorted(dataset.items())),
        attributes=derive(dataset),
    )


def value(result: DicomJson, keyword: str) -> Any:
    """The values of an attribute in a result (None when present without value)."""
    return result[TAGS[keyword][0]].get("Value")


def uids(results: list[DicomJson], keyword: str = "StudyInstanceUID") -> list[str]:
    """The first value of a UID attribute in each result."""
    return [value(result, keyword)[0] for result in results]


async def claim(
    store: MetadataStore, now: datetime, *, limit: int = 100, max_idle: timedelta = timedelta(days=1)
) -> list[ReadyStudy]:
    """The bursts claimable at ``now`` (no quiet period; the lease is ``LEASE``)."""
    return await store.claim_ready(now, quiet=timedelta(0), max_idle=max_idle, lease=LEASE, limit=limit)


async def find(store: MetadataStore, level: str = "study", *matches: Match, **kw: int) -> list[str]:
    """UIDs of the level's results for these matches."""
    key = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}[level]
    return uids(await store.query(Query(level, matches, **kw)), key)  # type: ignore[arg-type]


async def index_all(store: MetadataStore, search: SearchIndex) -> None:
    """Index what the store's outbox holds, as the indexer does, and make it searchable now."""
    pending = await store.studies_to_index()
    await search.index_studies([study for study, _ in pending])
    refresh = getattr(search, "refresh", None)
    if refresh is not None:
        await refresh()


async def three_studies(store: MetadataStore) -> None:
    """Three patients on three dates; the second study has two series (CT, MR)."""
    outcomes = await store.put_instances([
        make("1.2.1", "1.2.1.1", "1.2.1.1.1", patient="Doe^John", patient_id="P1", study_date="20240102"),
        make("1.2.2", "1.2.2.1", "1.2.2.1.1", patient="Smith^Anna", patient_id="P2", study_date="20240315",
             description="BRAIN MR", accession="A2", modality="MR", sop_class=MR_IMAGE),
        make("1.2.2", "1.2.2.2", "1.2.2.2.1", patient="Smith^Anna", patient_id="P2", study_date="20240315",
             modality="CT", series_number=2),
        make("1.2.3", "1.2.3.1", "1.2.3.1.1", patient="Dow^Jane", patient_id="P3", study_date="20231231",
             description="ABDOMEN", accession="A3"),
    ])
    assert outcomes == [PutOutcome.CREATED] * 4


async def test_ping(store: MetadataStore, search: SearchIndex) -> None:
    assert await store.ping()
    assert await search.ping()


async def test_the_patients_of_studies_for_the_audit(store: MetadataStore) -> None:
    await three_studies(store)
    issued = make("1.2.4", "1.2.4.1", "1.2.4.1.1", patient_id=" P4 ")
    issued.dataset[TAGS["IssuerOfPatientID"][0]] = element("IssuerOfPatientID", "HOSP A")
    issued = replace(issued, attributes=derive(issued.dataset))
    assert await store.put_instances([issued]) == [PutOutcome.CREATED]
    found = await store.study_patients(["1.2.2", "1.2.4", "9.9.9", "1.2.2"])
    assert found == {"1.2.2": StudyPatient("P2", ""), "1.2.4": StudyPatient("P4", "HOSP A")}
    assert await store.study_patients([]) == {}


async def test_put_duplicate_and_conflict(store: MetadataStore) -> None:
    record = make()
    assert await store.put_instances([record]) == [PutOutcome.CREATED]
    assert await store.put_instances([record]) == [PutOutcome.DUPLICATE]
    assert await store.put_instances([replace(record, sha256="b" * 64)]) == [PutOutcome.CONFLICT]
    assert await store.get_instance(record.sop_instance_uid) == record
    assert await store.get_instance("9.9.9") is None
    [study] = await store.query(Query("study"))
    assert value(study, "NumberOfStudyRelatedInstances") == [1]


async def test_batch_outcomes_are_in_order(store: MetadataStore) -> None:
    first, second = make(sop="1.2.1.1.1"), make(sop="1.2.1.1.2", instance_number=2)
    await store.put_instances([first])
    outcomes = await store.put_instances([second, first, replace(first, sha256="c" * 64), second])
    assert outcomes == [PutOutcome.CREATED, PutOutcome.DUPLICATE, PutOutcome.CONFLICT, PutOutcome.DUPLICATE]
    assert len(await store.list_instances("1.2.1")) == 2


async def test_aggregates_count_series_instances_and_modalities(store: MetadataStore) -> None:
    await three_studies(store)
    await store.put_instances([make("1.2.2", "1.2.2.2", "1.2.2.2.2", modality="CT", series_number=2,
                                    instance_number=2, patient="Smith^Anna", patient_id="P2")])
    [study] = await store.query(Query("study", [Match("StudyInstanceUID", "uids", ["1.2.2"])]))
    assert value(study, "NumberOfStudyRelatedSeries") == [2]
    assert value(study, "NumberOfStudyRelatedInstances") == [3]
    assert value(study, "ModalitiesInStudy") == ["CT", "MR"]
    series = await store.query(Query("series", [Match("StudyInstanceUID", "uids", ["1.2.2"])]))
    assert [value(s, "NumberOfSeriesRelatedInstances") for s in series] == [[1], [2]]


async def test_study_response_has_every_study_attribute(store: MetadataStore) -> None:
    await store.put_instances([make(study_date=None)])
    [study] = await store.query(Query("study"))
    assert {TAGS[kw][0] for kw in STUDY_ATTRIBUTES} <= set(study)
    assert study[TAGS["StudyDate"][0]] == {"vr": "DA"}
    assert study[TAGS["PatientSex"][0]] == {"vr": "CS"}
    assert value(study, "PatientName") == [{"Alphabetic": "Doe^John"}]
    assert value(study, "StudyInstanceUID") == ["1.2.1"]
    assert value(study, "InstanceAvailability") == ["ONLINE"]
    assert "7FE00010" not in study and TAGS["Modality"][0] not in study
    assert list(study) == sorted(study)


async def test_list_instances_order_and_filters(store: MetadataStore) -> None:
    await store.put_instances([
        make(series="1.2.1.2", sop="1.2.1.2.1", series_number=2, instance_number=1, sha="b"),
        make(series="1.2.1.1", sop="1.2.1.1.3", series_number=1, instance_number=3, sha="c"),
        make(series="1.2.1.1", sop="1.2.1.1.1", series_number=1, instance_number=1, sha="d"),
        make(series="1.2.1.1", sop="1.2.1.1.2", series_number=1, instance_number=2, sha="e"),
    ])
    listed = await store.list_instances("1.2.1")
    assert [r.sop_instance_uid for r in listed] == ["1.2.1.1.1", "1.2.1.1.2", "1.2.1.1.3", "1.2.1.2.1"]
    assert [r.sop_instance_uid for r in await store.list_instances("1.2.1", "1.2.1.2")] == ["1.2.1.2.1"]
    one = await store.list_instances("1.2.1", "1.2.1.1", "1.2.1.1.2")
    assert [r.sha256 for r in one] == ["e" * 64]
    assert await store.list_instances("9.9") == []


async def test_delete_updates_aggregates_and_representative(store: MetadataStore) -> None:
    await store.put_instances([
        make(sop="1.2.1.1.1", patient="First^Patient", description="FIRST"),
        make(sop="1.2.1.1.2", instance_number=2, patient="Second^Patient", description="SECOND"),
        make(series="1.2.1.2", sop="1.2.1.2.1", modality="MR", series_number=2),
    ])
    await store.delete_instance("1.2.1.2.1")
    [study] = await store.query(Query("study"))
    assert value(study, "NumberOfStudyRelatedSeries") == [1]
    assert value(study, "NumberOfStudyRelatedInstances") == [2]
    assert value(study, "ModalitiesInStudy") == ["CT"]
    await store.delete_instance("1.2.1.1.1")
    [study] = await store.query(Query("study"))
    assert value(study, "StudyDescription") == ["SECOND"]
    assert await find(store, "study", Match("PatientName", "exact", "SECOND^PATIENT")) == ["1.2.1"]
    [series] = await store.query(Query("series"))
    assert value(series, "NumberOfSeriesRelatedInstances") == [1]
    await store.delete_instance("1.2.1.1.1")  # already gone: nothing happens
    await store.delete_instance("1.2.1.1.2")
    assert await store.query(Query("study")) == []
    assert await store.query(Query("series")) == []
    assert await store.get_instance("1.2.1.1.2") is None


async def test_match_exact_and_uids(store: MetadataStore) -> None:
    await three_studies(store)
    assert await find(store, "study", Match("PatientID", "exact", "P2")) == ["1.2.2"]
    assert await find(store, "study", Match("StudyInstanceUID", "uids", ["1.2.3", "1.2.1", "9.9"])) == [
        "1.2.1", "1.2.3"]
    assert await find(store, "study", Match("AccessionNumber", "uids", ["A2", "A3"])) == ["1.2.2", "1.2.3"]
    many = [f"9.{i}" for i in range(1500)] + ["1.2.2"]  # as a fuzzy name search may hand over
    assert await find(store, "study", Match("StudyInstanceUID", "uids", many)) == ["1.2.2"]
    assert await find(store, "study", Match("PatientName", "exact", "doe^john")) == ["1.2.1"]
    assert await find(store, "study", Match("PatientID", "exact", "p2")) == []  # case-sensitive
    assert await find(store, "study", Match("PatientID", "exact", "P1"), Match("StudyDate", "exact",
                                                                              "20240315")) == []


async def test_match_wildcards_and_case_insensitive_names(store: MetadataStore) -> None:
    await three_studies(store)
    assert await find(store, "study", Match("PatientName", "wildcard", "DO*")) == ["1.2.1", "1.2.3"]
    assert await find(store, "study", Match("PatientName", "wildcard", "do?^*")) == ["1.2.1", "1.2.3"]
    assert await find(store, "study", Match("PatientName", "wildcard", "*^ANNA")) == ["1.2.2"]
    assert await find(store, "study", Match("PatientName", "wildcard", "D?E*")) == ["1.2.1"]
    assert await find(store, "study", Match("PatientName", "wildcard", "*")) == ["1.2.2", "1.2.1", "1.2.3"]
    assert await find(store, "study", Match("StudyDescription", "wildcard", "*MR")) == ["1.2.2"]
    assert await find(store, "study", Match("StudyDescription", "wildcard", "*mr")) == []
    assert await find(store, "study", Match("AccessionNumber", "wildcard", "A.")) == []  # "." is literal


async def test_match_date_ranges(store: MetadataStore) -> None:
    await three_studies(store)
    this_year = Match("StudyDate", "range", ("20240101", "20241231"))
    assert await find(store, "study", this_year) == ["1.2.2", "1.2.1"]
    assert await find(store, "study", Match("StudyDate", "range", ("20240102", None))) == ["1.2.2", "1.2.1"]
    assert await find(store, "study", Match("StudyDate", "range", (None, "20240102"))) == ["1.2.1", "1.2.3"]
    assert await find(store, "study", Match("StudyDate", "range", ("20240103", "20240314"))) == []
    found = await find(store, "study", Match("StudyDate", "range", ("20240101", None)),
                       Match("PatientName", "wildcard", "DO*"))
    assert found == ["1.2.1"]


async def test_match_modalities_in_study(store: MetadataStore) -> None:
    await three_studies(store)
    assert await find(store, "study", Match("ModalitiesInStudy", "exact", "MR")) == ["1.2.2"]
    ct = Match("ModalitiesInStudy", "uids", ["CT"])
    assert await find(store, "study", ct) == ["1.2.2", "1.2.1", "1.2.3"]
    assert await find(store, "series", Match("ModalitiesInStudy", "exact", "MR")) == ["1.2.2.1", "1.2.2.2"]


async def test_study_attribute_in_a_series_query_filters_by_parent_study(store: MetadataStore) -> None:
    await three_studies(store)
    assert await find(store, "series", Match("PatientID", "exact", "P2")) == ["1.2.2.1", "1.2.2.2"]
    smith, ct = Match("PatientName", "wildcard", "SMITH*"), Match("Modality", "exact", "CT")
    found = await find(store, "instance", smith, ct)
    assert found == ["1.2.2.2.1"]


async def test_instance_attribute_in_a_study_query_keeps_studies_having_it(store: MetadataStore) -> None:
    await three_studies(store)
    assert await find(store, "study", Match("SOPClassUID", "exact", MR_IMAGE)) == ["1.2.2"]
    assert await find(store, "study", Match("Modality", "exact", "MR")) == ["1.2.2"]
    assert await find(store, "study", Match("SeriesInstanceUID", "uids", ["1.2.3.1"])) == ["1.2.3"]


async def test_series_and_instance_queries(store: MetadataStore) -> None:
    await three_studies(store)
    await store.put_instances([
        make("1.2.1", "1.2.1.1", "1.2.1.1.3", instance_number=3),
        make("1.2.1", "1.2.1.1", "1.2.1.1.2", instance_number=2),
    ])
    series = await store.query(Query("series", [Match("StudyInstanceUID", "uids", ["1.2.2"])]))
    assert uids(series, "SeriesInstanceUID") == ["1.2.2.1", "1.2.2.2"]
    assert value(series[0], "StudyInstanceUID") == ["1.2.2"]
    assert value(series[0], "Modality") == ["MR"]
    assert value(series[1], "SeriesNumber") == [2]
    assert TAGS["PatientName"][0] not in series[0]
    assert await find(store, "series", Match("Modality", "exact", "MR")) == ["1.2.2.1"]
    assert await find(store, "series", Match("SeriesNumber", "exact", "2")) == ["1.2.2.2"]
    instances = await store.query(Query("instance", [Match("SeriesInstanceUID", "uids", ["1.2.1.1"])]))
    assert uids(instances, "SOPInstanceUID") == ["1.2.1.1.1", "1.2.1.1.2", "1.2.1.1.3"]
    assert value(instances[0], "SeriesInstanceUID") == ["1.2.1.1"]
    assert value(instances[0], "Rows") == [512]
    assert value(instances[0], "NumberOfFrames") is None
    found = await find(store, "instance", Match("SeriesInstanceUID", "uids", ["1.2.1.1"]),
                       Match("InstanceNumber", "range", (2, None)))
    assert found == ["1.2.1.1.2", "1.2.1.1.3"]


async def test_limit_offset_and_study_order(store: MetadataStore) -> None:
    await store.put_instances([
        make(f"1.3.{i}", f"1.3.{i}.1", f"1.3.{i}.1.1", study_date="20240101" if i % 2 else "20240202")
        for i in range(1, 8)
    ])
    everything = await find(store, "study")
    assert everything == ["1.3.2", "1.3.4", "1.3.6", "1.3.1", "1.3.3", "1.3.5", "1.3.7"]
    assert await find(store, "study", limit=3) == everything[:3]
    assert await find(store, "study", limit=3, offset=3) == everything[3:6]
    assert await find(store, "study", limit=3, offset=6) == everything[6:]
    assert await find(store, "study", offset=10) == []


async def test_unknown_attribute_or_fuzzy_kind_is_refused(store: MetadataStore) -> None:
    with pytest.raises(ValueError, match="not an attribute"):
        await store.query(Query("study", [Match("PixelData", "exact", "x")]))
    with pytest.raises(ValueError, match="fuzzy"):
        await store.query(Query("study", [Match("PatientName", "fuzzy", "DOE")]))
    with pytest.raises(ValueError, match="number"):
        await store.query(Query("instance", [Match("InstanceNumber", "exact", "one")]))


async def test_assembly_boundary_and_quiet_period(store: MetadataStore) -> None:
    await store.put_instances([make(sop="1.2.1.1.1", received_at=T0, source="dimse:CT1@10.0.0.1")])
    await store.put_instances([make(sop="1.2.1.1.2", received_at=T0 + timedelta(seconds=5), sha="b")])
    later = T0 + timedelta(minutes=5)
    assert await claim(store, later) == []  # no boundary yet
    await store.mark_boundary(["1.2.1", "9.9.9"], T0 + timedelta(seconds=6))
    assert await claim(store, T0 + timedelta(seconds=5)) == []  # not quiet long enough
    await store.put_instances([make(sop="1.2.1.1.3", received_at=T0 + timedelta(seconds=7), sha="c")])
    assert await claim(store, later) == []  # a new arrival cleared the boundary
    await store.mark_boundary(["1.2.1"], T0 + timedelta(seconds=8))
    quiet = await store.claim_ready(
        T0 + timedelta(seconds=9), quiet=timedelta(seconds=2), max_idle=timedelta(days=1), lease=LEASE
    )
    assert quiet == []  # the last arrival (7 s) is not 2 s before 9 s
    [ready] = await claim(store, later)
    assert (ready.study_uid, ready.burst, ready.burst_instances, ready.total_instances) == ("1.2.1", 1, 3, 3)
    assert ready.patient_id == "P1"
    assert ready.modalities == ("CT",)
    assert ready.sources == ("dimse:CT1@10.0.0.1", "stow:test")
    assert await claim(store, later) == []  # claimed: its lease runs
    await store.ack_ready("1.2.1", 1)
    await store.put_instances([make(sop="1.2.1.1.1", received_at=later)])  # a duplicate starts no burst
    await store.mark_boundary(["1.2.1"], later)
    assert await claim(store, later + timedelta(days=2)) == []


async def test_later_burst_gets_the_next_number_and_its_own_count(store: MetadataStore) -> None:
    await store.put_instances([make(sop="1.2.1.1.1"), make(sop="1.2.1.1.2", sha="b")])
    await store.mark_boundary(["1.2.1"], T0)
    [first] = await claim(store, T0 + timedelta(minutes=1))
    later = T0 + timedelta(minutes=1, seconds=10)
    # Arrives while the first burst is claimed, not yet acknowledged: it opens the next burst.
    await store.put_instances([
        make(series="1.2.1.2", sop="1.2.1.2.1", sha="c", modality="SR", received_at=later, source="stow:ai")
    ])
    await store.ack_ready("1.2.1", first.burst)
    await store.mark_boundary(["1.2.1"], later)
    [second] = await claim(store, later + timedelta(seconds=1))
    assert (first.burst, first.burst_instances) == (1, 2)
    assert (second.burst, second.burst_instances, second.total_instances) == (2, 1, 3)
    assert second.modalities == ("CT", "SR")
    assert second.sources == ("stow:ai",)


async def test_claim_ready_hands_each_burst_out_once_to_concurrent_claimers(
    store: MetadataStore, other_store: MetadataStore
) -> None:
    await store.put_instances([
        make(f"1.4.{i}", f"1.4.{i}.1", f"1.4.{i}.1.1", received_at=T0) for i in range(12)
    ])
    await store.mark_boundary([f"1.4.{i}" for i in range(12)], T0)
    everything = sorted(f"1.4.{i}" for i in range(12))

    async def claim_concurrently(now: datetime) -> list[str]:
        claimers = [claim(s, now, limit=5) for s in (store, other_store) * 4]
        claimed = [ready.study_uid for batch in await asyncio.gather(*claimers) for ready in batch]
        return claimed + [ready.study_uid for ready in await claim(store, now)]  # any a claimer left over

    assert sorted(await claim_concurrently(T0 + timedelta(minutes=1))) == everything
    # Nobody acknowledged: once the leases expire, each burst is handed out once again.
    assert sorted(await claim_concurrently(T0 + timedelta(minutes=1) + LEASE * 2)) == everything


async def test_concurrent_puts_to_one_study_count_every_instance(
    store: MetadataStore, other_store: MetadataStore
) -> None:
    def batch(n: int) -> list[InstanceRecord]:
        series = f"1.5.1.{n % 2}"
        return [make("1.5", series, f"{series}.{n}.{i}", series_number=n % 2, modality=("CT", "PT")[n % 2],
                     received_at=T0 + timedelta(seconds=n), source=f"stow:client{n % 3}") for i in range(5)]

    puts = [s.put_instances(batch(n)) for n, s in enumerate((store, other_store) * 4)]
    results = await asyncio.gather(*puts)
    assert all(outcome is PutOutcome.CREATED for outcomes in results for outcome in outcomes)
    await store.mark_boundary(["1.5"], T0)
    [study] = await store.query(Query("study"))
    assert value(study, "NumberOfStudyRelatedInstances") == [40]
    assert value(study, "NumberOfStudyRelatedSeries") == [2]
    assert value(study, "ModalitiesInStudy") == ["CT", "PT"]
    series = await store.query(Query("series"))
    assert [value(s, "NumberOfSeriesRelatedInstances") for s in series] == [[20], [20]]
    [ready] = await claim(store, T0 + timedelta(minutes=1))
    assert (ready.burst, ready.burst_instances, ready.total_instances) == (1, 40, 40)
    assert ready.sources == ("stow:client0", "stow:client1", "stow:client2")
    assert len(await store.studies_to_index()) == 1


async def test_a_claim_not_acknowledged_is_claimable_again_after_its_lease(store: MetadataStore) -> None:
    await store.put_instances([make(sop="1.2.1.1.1"), make(sop="1.2.1.1.2", sha="b")])
    await store.mark_boundary(["1.2.1"], T0)
    claimed_at = T0 + timedelta(minutes=1)
    [first] = await claim(store, claimed_at)
    assert await claim(store, claimed_at + LEASE - timedelta(seconds=1)) == []  # its claimer may publish
    [again] = await claim(store, claimed_at + LEASE + timedelta(seconds=1))  # its claimer died
    assert again == first
    await store.ack_ready("1.2.1", again.burst)
    assert await claim(store, claimed_at + LEASE * 10) == []  # acknowledged: never again
    await store.ack_ready("1.2.1", again.burst)  # a second acknowledgement changes nothing
    await store.put_instances([make(sop="1.2.1.1.3", sha="c", received_at=T0 + timedelta(hours=1))])
    await store.mark_boundary(["1.2.1"], T0 + timedelta(hours=1))
    await store.ack_ready("1.2.1", 2)  # an open burst is not acknowledged before its claim
    [second] = await claim(store, T0 + timedelta(hours=2))
    assert (second.burst, second.burst_instances, second.total_instances) == (2, 1, 3)


async def test_a_missed_boundary_ends_the_burst_after_the_maximum_idle_time(store: MetadataStore) -> None:
    await store.put_instances([make(sop="1.2.1.1.1", received_at=T0)])
    await store.put_instances([make(sop="1.2.1.1.2", sha="b", received_at=T0 + timedelta(seconds=30))])
    max_idle = timedelta(minutes=5)
    assert await claim(store, T0 + timedelta(minutes=5), max_idle=max_idle) == []  # last arrival 30 s in
    [ready] = await claim(store, T0 + timedelta(minutes=6), max_idle=max_idle)
    assert (ready.study_uid, ready.burst, ready.burst_instances) == ("1.2.1", 1, 2)
    await store.ack_ready("1.2.1", 1)
    assert await claim(store, T0 + timedelta(days=1), max_idle=max_idle) == []


async def test_audit_outbox_holds_created_instances_until_cleared(store: MetadataStore) -> None:
    first, second = make(sop="1.2.1.1.1"), make(sop="1.2.1.1.2", instance_number=2, sha="b")
    assert await store.put_instances([first, second]) == [PutOutcome.CREATED] * 2
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert await store.pending_audit(datetime.now(UTC) - timedelta(minutes=1)) == []  # none stored before
    pending = await store.pending_audit(later)
    assert sorted(r.sop_instance_uid for r in pending) == ["1.2.1.1.1", "1.2.1.1.2"]
    assert {r.sop_instance_uid: r for r in pending}["1.2.1.1.2"] == await store.get_instance("1.2.1.1.2")
    assert len(await store.pending_audit(later, limit=1)) == 1
    third = make(sop="1.2.1.1.3", instance_number=3, sha="c")
    outcomes = await store.put_instances([first, make(sop="1.2.1.1.2", sha="z"), third])
    assert outcomes == [PutOutcome.DUPLICATE, PutOutcome.CONFLICT, PutOutcome.CREATED]
    pending = await store.pending_audit(later)
    assert sorted((r.sop_instance_uid, r.sha256) for r in pending) == [
        ("1.2.1.1.1", "a" * 64), ("1.2.1.1.2", "b" * 64), ("1.2.1.1.3", "c" * 64),
    ]
    await store.clear_audit(["1.2.1.1.1", "1.2.1.1.3"])
    await store.clear_audit([])
    assert [r.sop_instance_uid for r in await store.pending_audit(later)] == ["1.2.1.1.2"]
    assert await store.put_instances([first]) == [PutOutcome.DUPLICATE]  # published already: not again
    assert [r.sop_instance_uid for r in await store.pending_audit(later)] == ["1.2.1.1.2"]
    await store.delete_instance("1.2.1.1.2")
    assert await store.pending_audit(later) == []


async def test_index_outbox_skips_a_study_changed_meanwhile(store: MetadataStore) -> None:
    assert await store.index_lag_seconds() == 0
    await three_studies(store)
    await asyncio.sleep(0.01)
    assert await store.index_lag_seconds() > 0
    pending = await store.studies_to_index()
    assert sorted(uids([study for study, _ in pending])) == ["1.2.1", "1.2.2", "1.2.3"]
    versions = {value(study, "StudyInstanceUID")[0]: version for study, version in pending}
    [study_json] = [study for study, _ in pending if value(study, "StudyInstanceUID") == ["1.2.2"]]
    assert value(study_json, "NumberOfStudyRelatedInstances") == [2]
    await store.put_instances([make("1.2.1", "1.2.1.1", "1.2.1.1.2", instance_number=2, sha="b")])
    await store.mark_indexed(list(versions.items()))
    [(changed, version)] = await store.studies_to_index()
    assert value(changed, "StudyInstanceUID") == ["1.2.1"]
    assert value(changed, "NumberOfStudyRelatedInstances") == [2]
    assert version > versions["1.2.1"]
    await store.mark_indexed([("1.2.1", version)])
    assert await store.studies_to_index() == []
    assert await store.index_lag_seconds() == 0
    await store.delete_instance("1.2.1.1.2")
    assert uids([s for s, _ in await store.studies_to_index()]) == ["1.2.1"]


async def test_iter_studies_yields_every_study(store: MetadataStore) -> None:
    await three_studies(store)
    seen = [study async for study in store.iter_studies()]
    assert sorted(uids(seen)) == ["1.2.1", "1.2.2", "1.2.3"]
    assert all(TAGS["NumberOfStudyRelatedInstances"][0] in study for study in seen)


async def test_fuzzy_patient_names_through_the_search_index(
    store: MetadataStore, search: SearchIndex
) -> None:
    await three_studies(store)
    await store.put_instances([
        make("1.2.4", "1.2.4.1", "1.2.4.1.1", patient="Johnson^Mary", patient_id="P4")
    ])
    await index_all(store, search)
    assert await search.fuzzy_patient_names("DOE^JON") == ["1.2.1"]
    assert set(await search.fuzzy_patient_names("doe")) >= {"1.2.1"}
    assert await search.fuzzy_patient_names("John Doe") == ["1.2.1"]  # name order
    assert await search.fuzzy_patient_names("SMTIH^ANNA") == ["1.2.2"]  # swapped letters
    assert await search.fuzzy_patient_names("GARCIA") == []
    assert await search.fuzzy_patient_names("  ") == []
    close = await search.fuzzy_patient_names("DOE^JANE")
    assert close[0] == "1.2.3"  # DOW^JANE: one edit
    found = await store.query(Query("study", [Match("StudyInstanceUID", "uids", close)]))
    assert "1.2.3" in uids(found)


async def test_search_free_text(store: MetadataStore, search: SearchIndex) -> None:
    await three_studies(store)
    await index_all(store, search)
    assert await search.search("brain") == ["1.2.2"]
    assert await search.search("P3") == ["1.2.3"]
    assert await search.search("A2") == ["1.2.2"]
    assert await search.search("smith") == ["1.2.2"]
    assert await search.search("chest") == ["1.2.1"]
    assert await search.search("Brain Smith") == ["1.2.2"]
    assert await search.search("brain doe") == []
    assert await search.search("abdo") == ["1.2.3"]  # word prefix
    assert await search.search("nothing-like-this") == []
    assert len(await search.search("ct", limit=2)) == 2
    assert await search.search("ct", limit=2, offset=2) == [
        uid for uid in ["1.2.1", "1.2.2", "1.2.3"] if uid not in await search.search("ct", limit=2)
    ]


async def test_search_reset_and_replace(store: MetadataStore, search: SearchIndex) -> None:
    await three_studies(store)
    await index_all(store, search)
    [study] = await store.query(Query("study", [Match("StudyInstanceUID", "uids", ["1.2.1"])]))
    study[TAGS["PatientName"][0]] = element("PatientName", "Renamed^Patient")
    await search.index_studies([study])
    refresh = getattr(search, "refresh", None)
    if refresh is not None:
        await refresh()
    assert await search.fuzzy_patient_names("DOE^JOHN") == []
    assert await search.fuzzy_patient_names("RENAMED") == ["1.2.1"]
    await search.reset()
    if refresh is not None:
        await refresh()
    assert await search.search("brain") == []
    assert await search.fuzzy_patient_names("SMITH") == []


async def test_search_index_answers_study_queries_as_the_store(
    store: MetadataStore, search: SearchIndex
) -> None:
    await three_studies(store)
    await store.put_instances([
        make("1.2.4", "1.2.4.1", "1.2.4.1.1", patient=None, study_date=None, accession="A4"),
        make("1.2.5", "1.2.5.1", "1.2.5.1.1", patient="smith^bob", study_date="20240315", modality="US"),
    ])
    await index_all(store, search)
    attribute_queries = [
        Query("study"),
        Query("study", limit=2, offset=1),
        Query("study", [Match("PatientName", "wildcard", "SMITH*")]),
        Query("study", [Match("PatientName", "wildcard", "do?^*")]),
        Query("study", [Match("PatientName", "wildcard", "*^ANNA")]),
        Query("study", [Match("PatientName", "exact", "doe^john")]),
        Query("study", [Match("PatientName", "wildcard", "*")]),
        Query("study", [Match("StudyDate", "range", ("20240101", "20241231"))]),
        Query("study", [Match("StudyDate", "range", (None, "20240102"))]),
        Query("study", [Match("StudyDate", "exact", "20240315")]),
        Query("study", [Match("ModalitiesInStudy", "exact", "MR")]),
        Query("study", [Match("ModalitiesInStudy", "uids", ["CT", "US"])]),
        Query("study", [Match("ModalitiesInStudy", "wildcard", "U?")]),
        Query("study", [Match("AccessionNumber", "uids", ["A2", "A4"])]),
        Query("study", [Match("StudyDescription", "wildcard", "*MR")]),
        Query("study", [Match("StudyDescription", "wildcard", "*mr")]),
        Query("study", [Match("PatientID", "exact", "p2")]),
        Query("study", [Match("AccessionNumber", "wildcard", "A.")]),
        Query("study", [Match("NumberOfStudyRelatedInstances", "exact", 2)]),
        Query("study", [Match("InstanceAvailability", "exact", "OFFLINE")]),
        Query("study", [
            Match("StudyDate", "range", ("20240101", None)),
            Match("PatientName", "wildcard", "S*"),
        ]),
        Query("study", [
            Match("PatientName", "exact", "SMITH^BOB"),
            Match("ModalitiesInStudy", "exact", "US"),
        ]),
    ]
    answers = [await search.query_studies(query) for query in attribute_queries]
    assert len({answer is None for answer in answers}) == 1  # an index answers all of them or none
    # Attributes of series or instances need the store; an index may decline them.
    declined = [Query("study", [Match("Modality", "exact", "MR")]), Query("series"), Query("instance")]
    for query, answer in [
        *zip(attribute_queries, answers, strict=True),
        *[(query, await search.query_studies(query)) for query in declined],
    ]:
        if answer is not None:
            assert answer == await store.query(query), query


async def test_removed_study_leaves_the_search_index(store: MetadataStore, search: SearchIndex) -> None:
    await three_studies(store)
    await store.put_instances([make("1.2.9", "1.2.9.1", "1.2.9.1.1", patient="Gone^Soon", accession="A9")])
    await index_all(store, search)
    pending = await store.studies_to_index()
    await store.mark_indexed([(uids([study])[0], version) for study, version in pending])
    await store.delete_instance("1.2.9.1.1")
    [(tombstone, version)] = await store.studies_to_index()
    assert uids([tombstone]) == ["1.2.9"]
    assert value(tombstone, "NumberOfStudyRelatedInstances") == [0]
    assert await store.index_lag_seconds() >= 0
    await index_all(store, search)
    assert await search.fuzzy_patient_names("GONE^SOON") == []
    assert await search.search("A9") == []
    everything = await search.query_studies(Query("study"))
    assert everything is None or uids(everything) == ["1.2.2", "1.2.1", "1.2.3"]
    await store.mark_indexed([("1.2.9", version)])
    assert await store.studies_to_index() == []
    await store.put_instances([make("1.2.9", "1.2.9.1", "1.2.9.1.2", patient="Back^Again", sha="b")])
    [(study, again)] = await store.studies_to_index()
    assert value(study, "NumberOfStudyRelatedInstances") == [1]
    await store.mark_indexed([("1.2.9", version)])  # a stale version leaves the new change pending
    assert await store.studies_to_index() == [(study, again)]
