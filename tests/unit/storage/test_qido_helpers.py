"""The pieces shared by the stores and the search indexes: query planning, patterns, responses, names."""

import re

import pytest

from lucerna.core.dicom.attributes import LEVEL_ATTRIBUTES, TAGS
from lucerna.core.storage import _qido, _search
from lucerna.core.storage.ports import Match, Query

pytestmark = pytest.mark.unit


def test_plan_places_conditions_on_the_level_holding_the_attribute() -> None:
    plan = _qido.plan(Query("series", [
        Match("StudyInstanceUID", "uids", ["1.2"]),
        Match("PatientName", "wildcard", "doe*"),
        Match("Modality", "exact", "CT"),
        Match("SOPClassUID", "exact", "1.2.840.10008.5.1.4.1.1.2"),
        Match("SeriesNumber", "range", ("2", None)),
    ]))
    assert plan.conditions == {
        "series": [
            _qido.Condition("StudyInstanceUID", "in", ["1.2"]),
            _qido.Condition("Modality", "eq", "CT"),
            _qido.Condition("SeriesNumber", "range", (2, None)),
        ],
        "study": [_qido.Condition("PatientName", "wildcard", "DOE*")],
        "instance": [_qido.Condition("SOPClassUID", "eq", "1.2.840.10008.5.1.4.1.1.2")],
    }
    assert _qido.link("series", "study") == "StudyInstanceUID"
    assert _qido.link("series", "instance") == "SeriesInstanceUID"


def test_plan_drops_universal_matches_and_answers_availability() -> None:
    assert _qido.plan(Query("study", [Match("PatientName", "wildcard", "**")])).conditions == {}
    assert _qido.plan(Query("study", [Match("StudyDate", "range", ("", None))])).conditions == {}
    assert not _qido.plan(Query("study", [Match("InstanceAvailability", "exact", "ONLINE")])).impossible
    assert _qido.plan(Query("study", [Match("InstanceAvailability", "exact", "OFFLINE")])).impossible
    with pytest.raises(ValueError, match="number"):
        _qido.plan(Query("instance", [Match("InstanceNumber", "wildcard", "1*")]))


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("DOE*", ["DOE", "DOE^JOHN"], ["JDOE", "DO"]),
        ("D?E", ["DOE", "DUE"], ["DE", "DOOE"]),
        ("1.2.*", ["1.2.3"], ["1x2.3"]),
        ("A[1]*", ["A[1]B"], ["A1B"]),
        ("(x)+$^|{2}", ["(x)+$^|{2}"], ["x"]),
    ],
)
def test_wildcards_translate_literally_except_star_and_question_mark(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    regex = re.compile(_qido.wildcard_to_regex(pattern))
    assert all(regex.fullmatch(text) for text in matching)
    assert not any(regex.fullmatch(text) for text in not_matching)
    assert _qido.wildcard_to_glob("A[1]*") == "A[[]1]*"


def test_level_json_fills_every_attribute_of_the_level() -> None:
    dataset = {TAGS["Modality"][0]: {"vr": "CS", "Value": ["MR"]}, "7FE00010": {"vr": "OW"}}
    result = _qido.level_json("series", dataset, {
        "StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3", "NumberOfSeriesRelatedInstances": 4,
    })
    expected_tags = {TAGS[kw][0] for kw in (*LEVEL_ATTRIBUTES["series"], "StudyInstanceUID")}
    assert set(result) == expected_tags
    assert result[TAGS["Modality"][0]] == {"vr": "CS", "Value": ["MR"]}
    assert result[TAGS["SeriesDescription"][0]] == {"vr": "LO"}
    assert result[TAGS["NumberOfSeriesRelatedInstances"][0]] == {"vr": "IS", "Value": [4]}
    assert result[TAGS["InstanceAvailability"][0]] == {"vr": "CS", "Value": ["ONLINE"]}


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("JOHN", "JOHN", 0), ("JON", "JOHN", 1), ("SMTIH", "SMITH", 1), ("DOE", "DOW", 1), ("JANE", "JOHN", 3)],
)
def test_edit_distance(a: str, b: str, distance: int) -> None:
    assert _search.edit_distance(a, b, 5) == distance
    assert _search.edit_distance(a, b, 0) == (0 if distance == 0 else 1)


def test_name_words_and_tolerated_edits() -> None:
    assert _search.name_tokens("Doe^John^^Dr.") == ["DOE", "JOHN", "DR"]
    assert [_search.max_edits(w) for w in ("AB", "ABC", "ABCDE", "ABCDEF")] == [0, 1, 1, 2]
