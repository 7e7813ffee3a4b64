"""QIDO-RS matching and responses shared by the metadata stores (SQLite, MongoDB).

Each store keeps one row (document) per study, per series and per instance. A row holds the UIDs
that link it to its parents, its own level's derived attributes (taken from the first instance
stored, its *representative*), that instance's data set cut down to the level's attributes, and
the level's aggregates. ``plan`` turns a ``Query`` into normalised conditions grouped by the level
whose rows hold each attribute; a store translates a condition on its own level directly and a
condition on another level into "the linking UID is among those of the rows matching there" (so a
study attribute in a series query filters by the parent study, and an instance attribute in a
study query keeps the studies having such an instance). ``level_json`` builds one result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lucerna.core.dicom.attributes import (
    INSTANCE_ATTRIBUTES,
    INTEGERS,
    LEVEL_ATTRIBUTES,
    PERSON_NAMES,
    SERIES_ATTRIBUTES,
    STUDY_ATTRIBUTES,
    TAGS,
    normalise_name,
)
from lucerna.core.storage.ports import DicomJson, Level, Match, Query

LEVELS: tuple[Level, ...] = ("study", "series", "instance")
DEPTH: dict[Level, int] = {"study": 0, "series": 1, "instance": 2}
UID_OF: dict[Level, str] = {
    "study": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "instance": "SOPInstanceUID",
}
# Every instance of a store is ONLINE: its bytes are in the blob store.
AVAILABILITY = "ONLINE"

# The aggregates each level's row maintains (ModalitiesInStudy is a list, the others counts).
AGGREGATES_OF: dict[Level, tuple[str, ...]] = {
    "study": ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "series": ("NumberOfSeriesRelatedInstances",),
    "instance": (),
}
_NOT_STORED = frozenset({"InstanceAvailability", "RetrieveURL", *UID_OF.values()})
# The derived attributes each level's row holds for matching, besides UIDs and aggregates.
FIELDS_OF: dict[Level, tuple[str, ...]] = {
    "study": tuple(
        kw for kw in (*STUDY_ATTRIBUTES, "IssuerOfPatientID")
        if kw not in _NOT_STORED and kw not in AGGREGATES_OF["study"]
    ),
    "series": tuple(
        kw for kw in SERIES_ATTRIBUTES if kw not in _NOT_STORED and kw not in AGGREGATES_OF["series"]
    ),
    "instance": tuple(kw for kw in (*INSTANCE_ATTRIBUTES, "SpecificCharacterSet") if kw not in _NOT_STORED),
}
# The UIDs each level's row holds: its own and its parents'.
UIDS_OF: dict[Level, tuple[str, ...]] = {
    "study": ("StudyInstanceUID",),
    "series": ("StudyInstanceUID", "SeriesInstanceUID"),
    "instance": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
NATURAL_LEVEL: dict[str, Level] = {
    kw: level for level in LEVELS for kw in (*FIELDS_OF[level], *AGGREGATES_OF[level], UID_OF[level])
}
# The data set elements kept on a level's row to answer queries.
TAGS_OF: dict[Level, frozenset[str]] = {
    level: frozenset(TAGS[kw][0] for kw in (*FIELDS_OF[level], *UIDS_OF[level])) for level in LEVELS
}


@dataclass(frozen=True)
class Condition:
    """A normalised matching condition on one attribute.

    op: ``in`` (value: list), ``eq`` (scalar), ``wildcard`` (DICOM pattern with ``*``/``?``; see
    ``wildcard_to_glob``/``wildcard_to_regex``), ``range`` (value: (low, high), either may be None).
    """

    attribute: str
    op: Literal["in", "eq", "wildcard", "range"]
    value: Any


@dataclass(frozen=True)
class Plan:
    """The conditions of a query, grouped by the level whose rows hold the attribute."""

    level: Level
    conditions: dict[Level, list[Condition]] = field(default_factory=dict)
    impossible: bool = False  # statically known to match nothing


def plan(query: Query) -> Plan:
    """Normalise and place the query's matches; ``ValueError`` on one that cannot be answered."""
    result = Plan(query.level)
    for match in query.matches:
        if match.attribute == "InstanceAvailability":
            if not _static_match(match, AVAILABILITY):
                return Plan(query.level, impossible=True)
            continue
        condition = _condition(match)
        if condition is None:
            continue
        own = condition.attribute in UIDS_OF[query.level]
        holder = query.level if own else NATURAL_LEVEL[condition.attribute]
        result.conditions.setdefault(holder, []).append(condition)
    return result


def link(level: Level, other: Level) -> str:
    """The UID attribute joining rows of two levels (the UID of the higher one)."""
    return UID_OF[level] if DEPTH[level] < DEPTH[other] else UID_OF[other]


def _condition(match: Match) -> Condition | None:
    attribute = match.attribute
    if attribute not in NATURAL_LEVEL:
        raise ValueError(f"{attribute} is not an attribute the store can match on")
    if match.kind == "uids":
        values = match.value if isinstance(match.value, list | tuple) else [match.value]
        return Condition(attribute, "in", [normalise_value(attribute, v) for v in values])
    if match.kind == "exact":
        return Condition(attribute, "eq", normalise_value(attribute, match.value))
    if match.kind == "wildcard":
        pattern = str(match.value)
        if pattern.strip("*") == "":
            return None  # "*" matches every value, and no value
        if is_number(attribute):
            raise ValueError(f"{attribute} is a number: wildcard matching does not apply")
        if attribute in PERSON_NAMES:
            pattern = normalise_name(pattern)
        return Condition(attribute, "wildcard", pattern)
    if match.kind == "range":
        low, high = match.value
        if low in (None, "") and high in (None, ""):
            return None
        return Condition(
            attribute,
            "range",
            (
                None if low in (None, "") else normalise_value(attribute, low),
                None if high in (None, "") else normalise_value(attribute, high),
            ),
        )
    if match.kind == "fuzzy":
        raise ValueError("fuzzy matches are resolved by the search index into uids before the store")
    raise ValueError(f"unknown match kind {match.kind!r}")


def is_number(attribute: str) -> bool:
    """Whether the stores keep the attribute as an integer."""
    return attribute in INTEGERS or attribute.startswith("NumberOf")


def normalise_value(attribute: str, value: Any) -> Any:
    """A query value in the form the stores keep the attribute (``derive``'s normalisation)."""
    if is_number(attribute):
        try:
            return int(value)
        except (TypeError, ValueError) as bad:
            raise ValueError(f"{attribute} takes a number, not {value!r}") from bad
    text = str(value).strip()
    return normalise_name(text) if attribute in PERSON_NAMES else text


def _static_match(match: Match, actual: str) -> bool:
    if match.kind == "uids":
        values = match.value if isinstance(match.value, list | tuple) else [match.value]
        return actual in values
    if match.kind == "wildcard":
        return re.fullmatch(wildcard_to_regex(str(match.value)), actual, re.DOTALL) is not None
    return match.kind != "exact" or match.value == actual


def wildcard_to_glob(pattern: str) -> str:
    """A DICOM wildcard pattern as an SQLite GLOB pattern (``*``/``?`` kept, ``[`` made literal)."""
    return pattern.replace("[", "[[]")


_REGEX_SPECIAL = frozenset("\\.^$|+()[]{}/#-&~")


def wildcard_to_regex(pattern: str) -> str:
    """A DICOM wildcard pattern as an anchored regular expression understood by PCRE and RE2."""
    out = ["^"]
    for char in pattern:
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char in _REGEX_SPECIAL:
            out.append("\\" + char)
        else:
            out.append(char)
    out.append("$")
    return "".join(out)


def project(dataset: DicomJson, level: Level) -> DicomJson:
    """The elements of a data set a level's row keeps."""
    keep = TAGS_OF[level]
    return {tag: element for tag, element in dataset.items() if tag in keep}


def level_fields(attributes: dict[str, Any], level: Level) -> dict[str, Any]:
    """The derived attributes a level's row holds (None where the instance lacks them)."""
    return {kw: attributes.get(kw) for kw in FIELDS_OF[level]}


def level_json(level: Level, dataset: DicomJson, values: dict[str, Any]) -> DicomJson:
    """One QIDO-RS result: the level's attributes from ``dataset``, overridden by ``values``
    (UIDs and aggregates by keyword); an attribute without a value is present as ``{"vr": VR}``."""
    keywords = [*LEVEL_ATTRIBUTES[level], *UIDS_OF[level]]
    out: DicomJson = {}
    for keyword in keywords:
        tag, vr = TAGS[keyword]
        if keyword == "InstanceAvailability":
            out[tag] = {"vr": vr, "Value": [AVAILABILITY]}
        elif keyword in values:
            value = values[keyword]
            listed = sorted(value) if isinstance(value, list | tuple | set) else [value]
            out[tag] = {"vr": vr, "Value": listed} if listed and listed != [None] else {"vr": vr}
        elif tag in dataset:
            out[tag] = dataset[tag]
        else:
            out[tag] = {"vr": vr}
    return dict(sorted(out.items()))
