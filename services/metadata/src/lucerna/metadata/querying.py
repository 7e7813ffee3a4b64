"""Running a QIDO-RS search against the ports: fuzzy names through the search index, study-level
attribute searches from the search index when it answers them (ADR 0004), everything else from the
metadata store's matching, ``includefield`` attributes from a representative instance, and RetrieveURL."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

from lucerna.core.dicom.attributes import (
    LEVEL_ATTRIBUTES,
    TAGS,
    first_value,
)
from lucerna.core.storage.ports import (
    DicomJson,
    InstanceRecord,
    Level,
    Match,
    MetadataStore,
    Query,
    SearchIndex,
)
from lucerna.metadata.bulkdata import is_bulk_placeholder
from lucerna.metadata.qido import QidoRequest, include_field_tag
from lucerna.metadata.urls import instance_url, series_url, study_url

RETRIEVE_URL = TAGS["RetrieveURL"][0]
PATIENT_GROUP = "0010"

# With includefield=all a study answers with its patient (group 0010) and study attributes, a series
# adds its series attributes, an instance returns its whole header (bulk data excepted).
_STUDY_EXTRA = (
    "IssuerOfPatientID",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "ProcedureCodeSequence",
    "RequestingPhysician",
    "RequestedProcedureDescription",
    "StudyComments",
)
_SERIES_EXTRA = (
    "SeriesDate",
    "SeriesTime",
    "ProtocolName",
    "Laterality",
    "PerformingPhysicianName",
    "OperatorsName",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "FrameOfReferenceUID",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepDescription",
    "RequestAttributesSequence",
    "PatientPosition",
)
_ALL_TAGS: dict[Level, frozenset[str]] = {
    "study": frozenset(include_field_tag(kw) for kw in (*LEVEL_ATTRIBUTES["study"], *_STUDY_EXTRA)),
    "series": frozenset(
        include_field_tag(kw)
        for kw in (*LEVEL_ATTRIBUTES["study"], *_STUDY_EXTRA, *LEVEL_ATTRIBUTES["series"], *_SERIES_EXTRA)
    ),
}


async def resolve_fuzzy(query: Query, search: SearchIndex) -> Query | None:
    """The query with ``fuzzy`` person-name matches replaced by the Study UIDs the search index finds
    for them; None when a fuzzy name matches no study at all."""
    matches: list[Match] = []
    for match in query.matches:
        if match.kind != "fuzzy":
            matches.append(match)
            continue
        uids = await search.fuzzy_patient_names(str(match.value))
        if not uids:
            return None
        matches.append(Match("StudyInstanceUID", "uids", list(uids)))
    return replace(query, matches=tuple(matches))


async def run_qido(
    request: QidoRequest, metadata: MetadataStore, search: SearchIndex, base: str
) -> list[DicomJson]:
    """The DICOM JSON results of a QIDO-RS request, each with its RetrieveURL and requested fields."""
    query = await resolve_fuzzy(request.query, search)
    if query is None:
        return []
    results = await find(query, metadata, search)
    return [await _complete(result, request, metadata, base) for result in results]


async def find(query: Query, metadata: MetadataStore, search: SearchIndex) -> list[DicomJson]:
    """The query's matches: a study-level search on attributes from the search index when it
    answers it (near-real-time: as of the last indexing); a query naming Study Instance UIDs (a
    lookup, or a fuzzy name resolved to UIDs), any other level, and any query the index declines,
    from the store (consistent, read-your-writes)."""
    by_uid = any(match.attribute == "StudyInstanceUID" for match in query.matches)
    if query.level == "study" and not by_uid:
        found = await search.query_studies(query)
        if found is not None:
            return found
    return await metadata.query(query)


async def _complete(result: DicomJson, request: QidoRequest, metadata: MetadataStore, base: str) -> DicomJson:
    level = request.query.level
    wanted = set(request.include_tags) - {RETRIEVE_URL}
    study_uid = first_value(result, "StudyInstanceUID")
    series_uid = first_value(result, "SeriesInstanceUID")
    sop_uid = first_value(result, "SOPInstanceUID")
    missing_hierarchy = level != "study" and (
        study_uid is None or (level == "instance" and series_uid is None)
    )
    representative: InstanceRecord | None = None
    if request.include_all or missing_hierarchy or any(tag not in result for tag in wanted):
        representative = await representative_instance(level, result, metadata)
    if representative is not None:
        study_uid = study_uid or representative.study_uid
        series_uid = series_uid or representative.series_uid
        for tag in sorted(_tags_to_add(level, request, representative.dataset, wanted)):
            element = representative.dataset.get(tag)
            if tag not in result and element is not None and not is_bulk_placeholder(element):
                result[tag] = copy.deepcopy(element)
    url = _retrieve_url(level, base, study_uid, series_uid, sop_uid)
    if url is not None:
        result[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return dict(sorted(result.items()))


def _retrieve_url(
    level: Level, base: str, study: str | None, series: str | None, sop: str | None
) -> str | None:
    if study is None:
        return None
    if level == "study":
        return study_url(base, study)
    if series is None:
        return None
    if level == "series":
        return series_url(base, study, series)
    return instance_url(base, study, series, sop) if sop is not None else None


def _tags_to_add(level: Level, request: QidoRequest, dataset: DicomJson, wanted: set[str]) -> set[str]:
    if not request.include_all:
        return wanted
    if level == "instance":
        return set(dataset) | wanted
    patient = {tag for tag in dataset if tag.startswith(PATIENT_GROUP)}
    return patient | _ALL_TAGS[level] | wanted


async def representative_instance(
    level: Level, result: DicomJson, metadata: MetadataStore
) -> InstanceRecord | None:
    """One stored instance of a study/series result (or the instance itself) whose header supplies
    the attributes the store's result does not carry."""
    if level == "instance":
        sop_uid = first_value(result, "SOPInstanceUID")
        return await metadata.get_instance(str(sop_uid)) if sop_uid else None
    matches: list[Match] = []
    for keyword in _identity(level):
        value = first_value(result, keyword)
        if value is not None:
            matches.append(Match(keyword, "uids", [str(value)]))
    if not matches:
        return None
    found = await metadata.query(Query(level="instance", matches=tuple(matches), limit=1))
    sop_uid = first_value(found[0], "SOPInstanceUID") if found else None
    return await metadata.get_instance(str(sop_uid)) if sop_uid else None


def _identity(level: Level) -> Sequence[str]:
    return ("StudyInstanceUID",) if level == "study" else ("StudyInstanceUID", "SeriesInstanceUID")
