"""QIDO-RS query parameters (PS3.18 8.3.4, 10.6) resolved into a storage ``Query``. Pure: no I/O.

Matching keys name an attribute by keyword or by tag (``PatientName=DOE*``, ``00100010=DOE*``).
By VR: UI takes one UID or a list (``,`` or ``\\`` separated); DA/TM take a value or a range
(``a-b``, ``-b``, ``a-``); PN and the string VRs take a value, with ``*``/``?`` wildcards; CS takes
a value or a list; IS/US an integer. An empty value is universal matching: the attribute is only
added to the response. ``fuzzymatching=true`` turns a PatientName key into a ``fuzzy`` match, which
the caller resolves through the search index.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date

from pydicom.datadict import dictionary_has_tag, keyword_for_tag, tag_for_keyword

from lucerna.core.dicom.attributes import (
    AGGREGATES,
    KEYWORD_OF_TAG,
    LEVEL_ATTRIBUTES,
    TAGS,
    is_valid_uid,
    normalise_name,
)
from lucerna.core.storage.ports import Level, Match, Query
from lucerna.metadata.errors import InvalidRequestError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CONTROL_PARAMETERS = frozenset({"includefield", "fuzzymatching", "limit", "offset", "accept", "charset"})

# The levels a query at each level may match on: its own and its parents' (relational queries).
_SCOPE: dict[Level, tuple[Level, ...]] = {
    "study": ("study",),
    "series": ("study", "series"),
    "instance": ("study", "series", "instance"),
}
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


@dataclass(frozen=True)
class QidoRequest:
    """A parsed QIDO-RS request: the storage query plus what to add to each result."""

    query: Query
    include_tags: frozenset[str] = frozenset()  # 8-digit upper-case hex tags
    include_all: bool = False
    limit_clamped: bool = False  # the client asked for more than MAX_LIMIT results


def matchable_keywords(level: Level) -> list[str]:
    """The keywords accepted as matching keys at a level."""
    keywords: list[str] = []
    for scope in _SCOPE[level]:
        for keyword in LEVEL_ATTRIBUTES[scope]:
            if keyword in AGGREGATES and not (keyword == "ModalitiesInStudy" and level == "study"):
                continue
            keywords.append(keyword)
    return keywords


def parse_qido(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> QidoRequest:
    """Resolve query-string pairs (in order, repeats kept) into a ``QidoRequest``;
    ``InvalidRequestError`` with a precise message for anything unknown, unsupported or malformed."""
    options = _Options()
    raw_matches: dict[str, str] = {}
    allowed = matchable_keywords(level)
    for name, value in params:
        if name.lower() in CONTROL_PARAMETERS:
            options.apply(name.lower(), value)
            continue
        keyword = _matching_keyword(name, level, allowed)
        if keyword in raw_matches:
            raise InvalidRequestError(f"matching key {keyword} is given more than once")
        raw_matches[keyword] = value

    matches: list[Match] = []
    if study_uid is not None:
        matches.append(Match("StudyInstanceUID", "uids", [study_uid]))
    if series_uid is not None:
        matches.append(Match("SeriesInstanceUID", "uids", [series_uid]))
    for keyword, value in raw_matches.items():
        if value == "":
            options.include_tags.add(TAGS[keyword][0])  # universal matching: return it, match all
        else:
            matches.append(_match(keyword, value, fuzzy=options.fuzzy))
    return QidoRequest(
        query=Query(level=level, matches=tuple(matches), limit=options.limit, offset=options.offset),
        include_tags=frozenset(options.include_tags),
        include_all=options.include_all,
        limit_clamped=options.limit_clamped,
    )


@dataclass
class _Options:
    """The non-matching parameters of a request, as they are read."""

    include_tags: set[str] = field(default_factory=set)
    include_all: bool = False
    fuzzy: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    limit_clamped: bool = False

    def apply(self, name: str, value: str) -> None:
        if name == "includefield":
            for item in _split_list(value, ","):
                if item.lower() == "all":
                    self.include_all = True
                else:
                    self.include_tags.add(include_field_tag(item))
        elif name == "fuzzymatching":
            self.fuzzy = _parse_bool(name, value)
        elif name == "limit":
            self.limit = _parse_int(name, value, minimum=1)
            if self.limit > MAX_LIMIT:
                self.limit, self.limit_clamped = MAX_LIMIT, True
        elif name == "offset":
            self.offset = _parse_int(name, value, minimum=0)
        # accept and charset are content negotiation, handled by the view


def include_field_tag(item: str) -> str:
    """The 8-digit tag of an ``includefield`` value given as a keyword or a tag."""
    if _HEX_TAG.match(item):
        return item.upper()
    if "." in item:
        raise InvalidRequestError(f"includefield {item!r}: attributes inside sequences are not supported")
    tag = tag_for_keyword(item)
    if tag is None:
        raise InvalidRequestError(f"includefield {item!r} is not a DICOM keyword or an 8-digit hex tag")
    return f"{tag:08X}"


def _matching_keyword(name: str, level: Level, allowed: Sequence[str]) -> str:
    if _HEX_TAG.match(name):
        tag = name.upper()
        keyword = KEYWORD_OF_TAG.get(tag) or (keyword_for_tag(int(tag, 16)) or tag)
        label = f"{keyword} ({tag})"
        if not dictionary_has_tag(int(tag, 16)) and tag not in KEYWORD_OF_TAG:
            raise InvalidRequestError(f"unknown matching key {name!r}: not a tag of the DICOM dictionary")
    elif "." in name:
        raise InvalidRequestError(f"matching key {name!r}: matching inside sequences is not supported")
    else:
        keyword = name
        tag_number = tag_for_keyword(name)
        if tag_number is None:
            raise InvalidRequestError(
                f"unknown query parameter {name!r}: not a DICOM keyword, an 8-digit hex tag, or one of "
                + ", ".join(sorted(CONTROL_PARAMETERS))
            )
        label = f"{keyword} ({tag_number:08X})"
    if keyword not in allowed:
        hint = (
            " (use ModalitiesInStudy at the study level)"
            if keyword == "Modality" and level == "study"
            else ""
        )
        raise InvalidRequestError(
            f"{label} is not supported as a matching key at the {level} level{hint}; supported: "
            + ", ".join(allowed)
        )
    return keyword


def _match(keyword: str, value: str, *, fuzzy: bool) -> Match:
    vr = TAGS[keyword][1]
    if vr == "PN":
        return _name_match(keyword, value, fuzzy=fuzzy and keyword == "PatientName")
    return _BY_VR.get(vr, _string_match)(keyword, value)


def _string_match(keyword: str, value: str) -> Match:
    if TAGS[keyword][1] == "CS":
        values = [item.upper() for item in _split_list(value, ",\\")]
        if len(values) > 1:
            return Match(keyword, "uids", values)
        value = values[0]
    if _has_wildcard(value):
        return Match(keyword, "wildcard", value.strip())
    return Match(keyword, "exact", value.strip())


def _integer_match(keyword: str, value: str) -> Match:
    return Match(keyword, "exact", _parse_int(keyword, value))


def _uid_match(keyword: str, value: str) -> Match:
    uids = _split_list(value, ",\\")
    for uid in uids:
        if not is_valid_uid(uid):
            raise InvalidRequestError(f"{keyword}: {uid!r} is not a valid UID")
    return Match(keyword, "uids", uids)


def _name_match(keyword: str, value: str, *, fuzzy: bool) -> Match:
    if fuzzy:
        name = value.replace("*", " ").replace("?", " ").strip()
        if not name:
            raise InvalidRequestError(f"{keyword}: fuzzy matching needs a name, not only wildcards")
        return Match(keyword, "fuzzy", name)
    if _has_wildcard(value):
        return Match(keyword, "wildcard", value.upper())
    return Match(keyword, "exact", normalise_name(value))


def _date_match(keyword: str, value: str) -> Match:
    if "-" not in value:
        return Match(keyword, "exact", _parse_date(keyword, value))
    low, _, high = value.partition("-")
    if not low and not high:
        raise InvalidRequestError(f"{keyword}: the range {value!r} has neither a start nor an end")
    start = _parse_date(keyword, low) if low else None
    end = _parse_date(keyword, high) if high else None
    if start is not None and end is not None and start > end:
        raise InvalidRequestError(f"{keyword}: the range {value!r} starts after it ends")
    return Match(keyword, "range", (start, end))


def _parse_date(keyword: str, text: str) -> str:
    text = text.strip()
    if len(text) != 8 or not text.isdigit():
        raise InvalidRequestError(f"{keyword}: {text!r} is not a date (DA is YYYYMMDD)")
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as error:
        raise InvalidRequestError(f"{keyword}: {text!r} is not a valid date ({error})") from None
    return text


def _time_match(keyword: str, value: str) -> Match:
    if "-" not in value:
        return Match(
            keyword, "range", (_parse_time(keyword, value, end=False), _parse_time(keyword, value, end=True))
        )
    low, _, high = value.partition("-")
    if not low and not high:
        raise InvalidRequestError(f"{keyword}: the range {value!r} has neither a start nor an end")
    start = _parse_time(keyword, low, end=False) if low else None
    end = _parse_time(keyword, high, end=True) if high else None
    if start is not None and end is not None and start > end:
        raise InvalidRequestError(f"{keyword}: the range {value!r} starts after it ends")
    return Match(keyword, "range", (start, end))


def _parse_time(keyword: str, text: str, *, end: bool) -> str:
    """HH[MM[SS[.F]]] as HHMMSS; the end of a range is padded to the end of its precision."""
    found = _TIME.match(text.strip())
    if not found:
        raise InvalidRequestError(f"{keyword}: {text!r} is not a time (TM is HHMMSS[.FFFFFF])")
    hours, minutes, seconds = found.group(1), found.group(2), found.group(3)
    if int(hours) > 23 or (minutes and int(minutes) > 59) or (seconds and int(seconds) > 60):
        raise InvalidRequestError(f"{keyword}: {text!r} is not a valid time")
    fill = "59" if end else "00"
    return hours + (minutes or fill) + (seconds or fill)


def _parse_int(name: str, value: str, minimum: int | None = None) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidRequestError(f"{name}: {value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise InvalidRequestError(f"{name}: {number} is below the minimum of {minimum}")
    return number


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in {"true", "false"}:
        raise InvalidRequestError(f"{name}: {value!r} is neither true nor false")
    return lowered == "true"


def _split_list(value: str, separators: str) -> list[str]:
    items: Iterable[str] = [value]
    for separator in separators:
        items = [piece for item in items for piece in item.split(separator)]
    cleaned = [item.strip() for item in items]
    if any(not item for item in cleaned):
        raise InvalidRequestError(f"{value!r} has an empty item in its list")
    return cleaned


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


_BY_VR: dict[str, Callable[[str, str], Match]] = {
    "UI": _uid_match,
    "DA": _date_match,
    "TM": _time_match,
    "IS": _integer_match,
    "US": _integer_match,
}
