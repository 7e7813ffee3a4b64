"""What the search indexes (SQLite FTS5, Elasticsearch) take from a study and how names are compared."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lucerna.core.dicom.attributes import TAGS, normalise_name, person_name_text
from lucerna.core.storage import _qido
from lucerna.core.storage.ports import DicomJson

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class StudyDocument:
    """The searchable fields of one study, from its study-level DICOM JSON."""

    study_uid: str
    patient_name: str  # normalised (upper case, ``^`` between components); "" when absent
    patient_id: str
    accession_number: str
    study_id: str
    study_date: str
    study_description: str
    referring_physician: str
    modalities: tuple[str, ...]

    @property
    def ids(self) -> str:
        """The identifiers a user may type, as one text."""
        return " ".join(value for value in (self.patient_id, self.accession_number, self.study_id) if value)

    @property
    def descriptions(self) -> str:
        """Descriptions, physician, modalities and date, as one text."""
        parts = (self.study_description, _spaced(self.referring_physician), *self.modalities, self.study_date)
        return " ".join(part for part in parts if part)


def study_document(study: DicomJson) -> StudyDocument:
    """The searchable fields of a study; ``ValueError`` when it has no Study Instance UID."""
    study_uid = _text(study, "StudyInstanceUID")
    if not study_uid:
        raise ValueError("a study document needs a StudyInstanceUID")
    modalities = study.get(TAGS["ModalitiesInStudy"][0], {}).get("Value") or []
    return StudyDocument(
        study_uid=study_uid,
        patient_name=_name(study, "PatientName"),
        patient_id=_text(study, "PatientID"),
        accession_number=_text(study, "AccessionNumber"),
        study_id=_text(study, "StudyID"),
        study_date=_text(study, "StudyDate"),
        study_description=_text(study, "StudyDescription"),
        referring_physician=_name(study, "ReferringPhysicianName"),
        modalities=tuple(str(m) for m in modalities),
    )


def tombstone(study_uid: str) -> DicomJson:
    """What ``studies_to_index`` hands over for a study that no longer exists: its UID, no instances."""
    return _qido.level_json("study", {}, {
        "StudyInstanceUID": study_uid, "ModalitiesInStudy": [],
        "NumberOfStudyRelatedSeries": 0, "NumberOfStudyRelatedInstances": 0,
    })


def is_tombstone(study: DicomJson) -> bool:
    """Whether a study handed to the index is a tombstone (a stored study has at least one instance)."""
    return _first(study, "NumberOfStudyRelatedInstances") == 0


def name_tokens(name: str) -> list[str]:
    """The words of a person name or query, upper case (``DOE^JOHN`` -> ``["DOE", "JOHN"]``)."""
    return _WORD.findall(name.upper())


def max_edits(token: str) -> int:
    """Edits tolerated for a word of this length, as Elasticsearch's ``fuzziness: AUTO``."""
    return 0 if len(token) <= 2 else 1 if len(token) <= 5 else 2


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (insert, delete, substitute, swap adjacent), or
    ``limit + 1`` as soon as it is known to exceed ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            cost = 0 if ca == cb else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        previous2, previous = previous, current
    return previous[-1] if previous[-1] <= limit else limit + 1


def _first(study: DicomJson, keyword: str) -> object:
    values = study.get(TAGS[keyword][0], {}).get("Value")
    return values[0] if values else None


def _text(study: DicomJson, keyword: str) -> str:
    value = _first(study, keyword)
    return "" if value is None else str(value).strip()


def _name(study: DicomJson, keyword: str) -> str:
    text = person_name_text(_first(study, keyword))
    return normalise_name(text) if text else ""


def _spaced(name: str) -> str:
    return " ".join(name_tokens(name))
