"""QIDO-RS query strings resolved into storage queries (pure)."""

import pytest

from lucerna.core.storage.ports import Match
from lucerna.metadata.errors import InvalidRequestError
from lucerna.metadata.qido import MAX_LIMIT, parse_qido

pytestmark = pytest.mark.unit


def _matches(level: str, *pairs: tuple[str, str]) -> list[Match]:
    return list(parse_qido(level, list(pairs)).query.matches)  # type: ignore[arg-type]


def _error(level: str, *pairs: tuple[str, str]) -> str:
    with pytest.raises(InvalidRequestError) as error:
        parse_qido(level, list(pairs))  # type: ignore[arg-type]
    return error.value.message


def test_keyword_and_tag_name_the_same_attribute() -> None:
    assert _matches("study", ("PatientID", "P1")) == [Match("PatientID", "exact", "P1")]
    assert _matches("study", ("00100020", "P1")) == [Match("PatientID", "exact", "P1")]
    assert _matches("study", ("0020000d", "1.2.3")) == [Match("StudyInstanceUID", "uids", ["1.2.3"])]


def test_uid_lists_split_on_commas_and_backslashes() -> None:
    assert _matches("study", ("StudyInstanceUID", "1.2.3,1.2.4\\1.2.5")) == [
        Match("StudyInstanceUID", "uids", ["1.2.3", "1.2.4", "1.2.5"])
    ]


def test_invalid_uid_is_refused() -> None:
    assert "'1.02.3' is not a valid UID" in _error("study", ("StudyInstanceUID", "1.2.3,1.02.3"))


def test_person_names_match_case_insensitively() -> None:
    assert _matches("study", ("PatientName", "doe*")) == [Match("PatientName", "wildcard", "DOE*")]
    assert _matches("study", ("PatientName", "Doe^John^")) == [Match("PatientName", "exact", "DOE^JOHN")]
    assert _matches("study", ("PatientName", "D?E")) == [Match("PatientName", "wildcard", "D?E")]


def test_fuzzy_patient_name_is_left_to_the_search_index() -> None:
    parsed = parse_qido("study", [("PatientName", "Jon*"), ("fuzzymatching", "true")])
    assert list(parsed.query.matches) == [Match("PatientName", "fuzzy", "Jon")]
    assert _matches("study", ("fuzzymatching", "false"), ("PatientName", "DOE")) == [
        Match("PatientName", "exact", "DOE")
    ]
    assert "neither true nor false" in _error("study", ("fuzzymatching", "yes"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20260101-20260131", Match("StudyDate", "range", ("20260101", "20260131"))),
        ("-20260131", Match("StudyDate", "range", (None, "20260131"))),
        ("20260101-", Match("StudyDate", "range", ("20260101", None))),
        ("20260115", Match("StudyDate", "exact", "20260115")),
    ],
)
def test_date_ranges(value: str, expected: Match) -> None:
    assert _matches("study", ("StudyDate", value)) == [expected]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-01-01", "'2026' is not a date"),
        ("20261301", "is not a valid date"),
        ("-", "neither a start nor an end"),
        ("20260201-20260101", "starts after it ends"),
    ],
)
def test_bad_date_ranges_are_refused(value: str, message: str) -> None:
    assert message in _error("study", ("StudyDate", value))


def test_time_ranges_cover_the_precision_given() -> None:
    assert _matches("study", ("StudyTime", "10-1130")) == [Match("StudyTime", "range", ("100000", "113059"))]
    assert _matches("study", ("StudyTime", "1015")) == [Match("StudyTime", "range", ("101500", "101559"))]
    assert "is not a time" in _error("study", ("StudyTime", "10:15"))
    assert "not a valid time" in _error("study", ("StudyTime", "2500"))


def test_modalities_take_a_list() -> None:
    assert _matches("study", ("ModalitiesInStudy", "ct,mr")) == [
        Match("ModalitiesInStudy", "uids", ["CT", "MR"])
    ]
    assert _matches("series", ("Modality", "CT")) == [Match("Modality", "exact", "CT")]


def test_modality_at_the_study_level_points_to_modalities_in_study() -> None:
    assert "use ModalitiesInStudy" in _error("study", ("Modality", "CT"))


def test_integer_keys_must_be_integers() -> None:
    assert _matches("series", ("SeriesNumber", "3")) == [Match("SeriesNumber", "exact", 3)]
    assert "'x' is not an integer" in _error("series", ("SeriesNumber", "x"))


def test_hierarchical_path_uids_become_matches() -> None:
    parsed = parse_qido("instance", [("InstanceNumber", "2")], study_uid="1.2", series_uid="1.2.3")
    assert list(parsed.query.matches) == [
        Match("StudyInstanceUID", "uids", ["1.2"]),
        Match("SeriesInstanceUID", "uids", ["1.2.3"]),
        Match("InstanceNumber", "exact", 2),
    ]


def test_relational_queries_match_on_parent_attributes() -> None:
    assert _matches("instance", ("PatientID", "P1")) == [Match("PatientID", "exact", "P1")]


def test_unknown_and_unsupported_keys_are_refused_precisely() -> None:
    assert "unknown query parameter 'Bogus'" in _error("study", ("Bogus", "1"))
    message = _error("study", ("PatientWeight", "70"))
    assert "PatientWeight (00101030) is not supported as a matching key at the study level" in message
    assert "SOPInstanceUID" in _error("study", ("SOPInstanceUID", "1.2"))
    assert "not a tag of the DICOM dictionary" in _error("study", ("7777AAAA", "1"))
    assert "inside sequences" in _error("study", ("00081032.00080100", "1"))
    assert "NumberOfStudyRelatedInstances" in _error("study", ("NumberOfStudyRelatedInstances", "3"))
    assert "given more than once" in _error("study", ("PatientID", "a"), ("00100020", "b"))


def test_empty_value_is_universal_matching_and_returns_the_attribute() -> None:
    parsed = parse_qido("study", [("PatientBirthDate", "")])
    assert list(parsed.query.matches) == []
    assert parsed.include_tags == {"00100030"}


def test_includefield_by_keyword_tag_list_or_all() -> None:
    parsed = parse_qido(
        "study", [("includefield", "PatientAge,00101030"), ("includefield", "InstitutionName")]
    )
    assert parsed.include_tags == {"00101010", "00101030", "00080080"}
    assert not parsed.include_all
    assert parse_qido("study", [("includefield", "all")]).include_all
    assert "is not a DICOM keyword" in _error("study", ("includefield", "NoSuchThing"))


def test_limit_and_offset() -> None:
    parsed = parse_qido("study", [("limit", "5"), ("offset", "10")])
    assert (parsed.query.limit, parsed.query.offset, parsed.limit_clamped) == (5, 10, False)
    clamped = parse_qido("study", [("limit", str(MAX_LIMIT + 1))])
    assert (clamped.query.limit, clamped.limit_clamped) == (MAX_LIMIT, True)
    assert "below the minimum of 1" in _error("study", ("limit", "0"))
    assert "'ten' is not an integer" in _error("study", ("limit", "ten"))
    assert "below the minimum of 0" in _error("study", ("offset", "-1"))


def test_content_negotiation_parameters_are_not_matching_keys() -> None:
    assert _matches("study", ("accept", "application/dicom+json"), ("charset", "utf-8")) == []
