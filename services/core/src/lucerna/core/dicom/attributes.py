"""The DICOM attributes Lucerna matches on, per query level, and how they are normalised.

Stored records keep the full header as DICOM JSON; ``derive`` adds flat, normalised copies of the
matching keys so that every store (SQLite, MongoDB) and the search index match the same way.
"""

from __future__ import annotations

import re
from typing import Any

from lucerna.core.storage.ports import DicomJson, Level

# keyword -> (tag as in DICOM JSON, VR)
TAGS: dict[str, tuple[str, str]] = {
    "SpecificCharacterSet": ("00080005", "CS"),
    "SOPClassUID": ("00080016", "UI"),
    "SOPInstanceUID": ("00080018", "UI"),
    "StudyDate": ("00080020", "DA"),
    "StudyTime": ("00080030", "TM"),
    "AccessionNumber": ("00080050", "SH"),
    "InstanceAvailability": ("00080056", "CS"),
    "Modality": ("00080060", "CS"),
    "ModalitiesInStudy": ("00080061", "CS"),
    "ReferringPhysicianName": ("00080090", "PN"),
    "StudyDescription": ("00081030", "LO"),
    "SeriesDescription": ("0008103E", "LO"),
    "RetrieveURL": ("00081190", "UR"),
    "PatientName": ("00100010", "PN"),
    "PatientID": ("00100020", "LO"),
    "IssuerOfPatientID": ("00100021", "LO"),
    "PatientBirthDate": ("00100030", "DA"),
    "PatientSex": ("00100040", "CS"),
    "BodyPartExamined": ("00180015", "CS"),
    "StudyInstanceUID": ("0020000D", "UI"),
    "SeriesInstanceUID": ("0020000E", "UI"),
    "StudyID": ("00200010", "SH"),
    "SeriesNumber": ("00200011", "IS"),
    "InstanceNumber": ("00200013", "IS"),
    "NumberOfStudyRelatedSeries": ("00201206", "IS"),
    "NumberOfStudyRelatedInstances": ("00201208", "IS"),
    "NumberOfSeriesRelatedInstances": ("00201209", "IS"),
    "NumberOfFrames": ("00280008", "IS"),
    "Rows": ("00280010", "US"),
    "Columns": ("00280011", "US"),
    "BitsAllocated": ("00280100", "US"),
    "PerformedProcedureStepStartDate": ("00400244", "DA"),
}
KEYWORD_OF_TAG: dict[str, str] = {tag: kw for kw, (tag, _) in TAGS.items()}

# The attributes each level returns by default (PS3.18 Table 10.6.3-3/-4/-5) and accepts as matching keys.
STUDY_ATTRIBUTES: tuple[str, ...] = (
    "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
    "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyID", "StudyDescription",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
SERIES_ATTRIBUTES: tuple[str, ...] = (
    "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "BodyPartExamined",
    "PerformedProcedureStepStartDate", "InstanceAvailability", "NumberOfSeriesRelatedInstances",
)
INSTANCE_ATTRIBUTES: tuple[str, ...] = (
    "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber",
    "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
)
LEVEL_ATTRIBUTES: dict[Level, tuple[str, ...]] = {
    "study": STUDY_ATTRIBUTES,
    "series": SERIES_ATTRIBUTES,
    "instance": INSTANCE_ATTRIBUTES,
}
# Derived per instance; the aggregates (ModalitiesInStudy, Number*) are the stores' business.
AGGREGATES = frozenset({
    "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances", "InstanceAvailability",
})
PERSON_NAMES = frozenset(kw for kw, (_, vr) in TAGS.items() if vr == "PN")
INTEGERS = frozenset(kw for kw, (_, vr) in TAGS.items() if vr in {"IS", "US"})

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """A UID per PS3.5 9.1: dotted numeric components without leading zeros, at most 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def first_value(dataset: DicomJson, keyword: str) -> Any:
    """The first value of an attribute in a DICOM JSON data set, or None."""
    element = dataset.get(TAGS[keyword][0])
    if not element:
        return None
    values = element.get("Value")
    return values[0] if values else None


def person_name_text(value: Any) -> str | None:
    """The alphabetic form of a DICOM JSON person name (``{"Alphabetic": "DOE^JOHN"}``)."""
    if isinstance(value, dict):
        text = value.get("Alphabetic")
        return text if isinstance(text, str) else None
    return value if isinstance(value, str) else None


def normalise_name(text: str) -> str:
    """Person names match case-insensitively and without trailing empty components."""
    return text.upper().rstrip("^ ").strip()


def derive(dataset: DicomJson) -> dict[str, Any]:
    """Flat, normalised matching fields of one instance (keyword -> str | int)."""
    out: dict[str, Any] = {}
    for keyword in TAGS:
        if keyword in AGGREGATES:
            continue
        value = first_value(dataset, keyword)
        if value is None:
            continue
        if keyword in PERSON_NAMES:
            text = person_name_text(value)
            if text:
                out[keyword] = normalise_name(text)
        elif keyword in INTEGERS:
            try:
                out[keyword] = int(value)
            except (TypeError, ValueError):
                continue
        else:
            out[keyword] = str(value).strip()
    return out
