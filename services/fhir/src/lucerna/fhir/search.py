"""FHIR search: the parameters each resource type offers, what a resource is indexed by, and a search
request's query string parsed into a ``SearchQuery`` (with its ``_include``/``_revinclude``,
``_elements`` and ``_summary``) or refused with a ``SearchError`` that names the parameter.

Parameters are R4's (names, paths, types) except ``DiagnosticReport.imaging-study``, which R4 lacks
and integrators ask for (ADR 0013). Matching follows R4: token ``[system]|[code]``, ``system|``,
``|code`` or ``code``; reference ``Type/id``, ``id``, an absolute URL ending in ``Type/id``, or
``:Type`` with an id; date with the prefixes ``eq ne gt lt ge le sa eb`` over ranges (a date without a
time zone is taken as UTC); string a case- and accent-insensitive prefix, ``:exact`` exact. Values
separated by commas are alternatives (OR); repeated parameters must all hold (AND).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

from lucerna.fhir.store import (
    Criterion,
    DateComparator,
    DateComparison,
    DateCriterion,
    IndexEntries,
    Json,
    PrefixCriterion,
    SearchQuery,
    SortKey,
    StoredResource,
    TermCriterion,
)

DEFAULT_COUNT = 20
MAX_COUNT = 1000


class SearchError(ValueError):
    """A search the server cannot run as asked (400 Bad Request), naming the parameter."""


class ParamType(StrEnum):
    TOKEN = "token"  # noqa: S105 - a FHIR search parameter type, not a secret
    REFERENCE = "reference"
    DATE = "date"
    STRING = "string"
    URI = "uri"


@dataclass(frozen=True)
class SearchParam:
    """One search parameter: name, type, where its values are (dotted paths; ``a|b`` alternatives
    are separate paths) and, for references, the types it may point to."""

    name: str
    type: ParamType
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    description: str = ""


def _p(name: str, kind: ParamType, *paths: str, targets: tuple[str, ...] = (), doc: str = "") -> SearchParam:
    return SearchParam(name, kind, paths, targets, doc)


T, R, D, S, U = ParamType.TOKEN, ParamType.REFERENCE, ParamType.DATE, ParamType.STRING, ParamType.URI

# Parameters every type has.
COMMON: tuple[SearchParam, ...] = (
    _p("_id", T, "id", doc="Logical id of the resource"),
    _p("_lastUpdated", D, "meta.lastUpdated", doc="When the resource version last changed"),
    _p("_security", T, "meta.security", doc="Security labels (e.g. AIAST)"),
    _p("_tag", T, "meta.tag", doc="Tags"),
)

PARAMETERS: Mapping[str, tuple[SearchParam, ...]] = {
    "DiagnosticReport": (
        _p("patient", R, "subject", targets=("Patient",), doc="The subject, when a patient"),
        _p("subject", R, "subject", targets=("Patient", "Group", "Device", "Location"), doc="The subject"),
        _p("identifier", T, "identifier", doc="A business identifier (e.g. urn:lucerna:job|<job id>)"),
        _p("status", T, "status", doc="The report's status"),
        _p("code", T, "code", doc="The report's code (LOINC)"),
        _p("category", T, "category", doc="The service section (v2-0074)"),
        _p("date", D, "effectiveDateTime", "effectivePeriod", doc="The clinically relevant time"),
        _p("issued", D, "issued", doc="When the report was issued"),
        _p("result", R, "result", targets=("Observation",), doc="Its Observations"),
        _p("conclusion", T, "conclusionCode", doc="A coded conclusion"),
        _p(
            "imaging-study",
            R,
            "imagingStudy",
            targets=("ImagingStudy",),
            doc="The ImagingStudy reported on (Lucerna; not an R4 standard parameter)",
        ),
    ),
    "Observation": (
        _p("patient", R, "subject", targets=("Patient",), doc="The subject, when a patient"),
        _p("subject", R, "subject", targets=("Patient", "Group", "Device", "Location"), doc="The subject"),
        _p("identifier", T, "identifier", doc="A business identifier"),
        _p("status", T, "status", doc="The observation's status"),
        _p("code", T, "code", doc="The finding's code (SNOMED CT)"),
        _p("category", T, "category", doc="Its category"),
        _p("date", D, "effectiveDateTime", "effectivePeriod", "effectiveInstant", doc="When it was observed"),
        _p("derived-from", R, "derivedFrom", targets=("ImagingStudy",), doc="What it was derived from"),
        _p("device", R, "device", targets=("Device",), doc="The device (algorithm) that made it"),
        _p("value-concept", T, "valueCodeableConcept", doc="Its coded value"),
        _p("component-code", T, "component.code", doc="The code of a component"),
        _p("body-site", T, "bodySite", doc="Where on the body (Lucerna; R5 has it)"),
    ),
    "ImagingStudy": (
        _p("patient", R, "subject", targets=("Patient",), doc="The subject, when a patient"),
        _p("subject", R, "subject", targets=("Patient", "Group", "Device"), doc="The subject"),
        _p("identifier", T, "identifier", doc="Study Instance UID (urn:dicom:uid) or accession number"),
        _p("status", T, "status", doc="The study's status"),
        _p("modality", T, "series.modality", doc="A series' modality (DCM)"),
        _p("started", D, "started", doc="When the study started"),
        _p("series", T, "series.uid", doc="A Series Instance UID"),
        _p("bodysite", T, "series.bodySite", doc="A series' body site"),
        _p("endpoint", R, "endpoint", "series.endpoint", targets=("Endpoint",), doc="Its DICOMweb endpoint"),
    ),
    "Patient": (
        _p("identifier", T, "identifier", doc="A patient identifier (system|PatientID)"),
        _p("name", S, "name", doc="Any part of the name"),
        _p("family", S, "name.family", doc="The family name"),
        _p("given", S, "name.given", doc="A given name"),
        _p("birthdate", D, "birthDate", doc="The date of birth"),
        _p("gender", T, "gender", doc="The administrative gender"),
    ),
    "Device": (
        _p("identifier", T, "identifier", doc="An identifier (model key, weights SHA-256)"),
        _p("device-name", S, "deviceName.name", doc="A name of the device"),
        _p("manufacturer", S, "manufacturer", doc="The manufacturer"),
        _p("type", T, "type", doc="The kind of device"),
        _p("status", T, "status", doc="The device's status"),
    ),
    "Provenance": (
        _p("target", R, "target", targets=("DiagnosticReport", "Observation"), doc="What it is about"),
        _p("patient", R, "target", targets=("Patient",), doc="Its target, when a patient"),
        _p("agent", R, "agent.who", targets=("Device", "Organization", "Practitioner"), doc="Who took part"),
        _p("entity", R, "entity.what", targets=("ImagingStudy",), doc="What was used"),
        _p("recorded", D, "recorded", doc="When it was recorded"),
        _p("when", D, "occurredDateTime", "occurredPeriod", doc="When the activity happened"),
    ),
    "Endpoint": (
        _p("identifier", T, "identifier", doc="An identifier"),
        _p("connection-type", T, "connectionType", doc="The protocol (e.g. dicom-wado-rs)"),
        _p("status", T, "status", doc="The endpoint's status"),
    ),
    "Subscription": (
        _p("status", T, "status", doc="requested | active | error | off"),
        _p("url", U, "channel.endpoint", doc="Where notifications go"),
        _p("criteria", S, "criteria", doc="The topic or criteria"),
        _p("type", T, "channel.type", doc="The channel type"),
    ),
}

SEARCHABLE_TYPES = tuple(PARAMETERS)

# Parameters that shape the result rather than select resources.
RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_offset",
        "_sort",
        "_include",
        "_revinclude",
        "_elements",
        "_summary",
        "_total",
        "_format",
        "_pretty",
    }
)

SORTABLE = frozenset({"_id", "_lastUpdated"})  # and every date parameter


def params_of(resource_type: str) -> dict[str, SearchParam]:
    """The search parameters of a type, by name (common ones included)."""
    return {param.name: param for param in (*COMMON, *PARAMETERS[resource_type])}


# --- Indexing ------------------------------------------------------------------------------------


def index_entries(stored: StoredResource, resource: Json) -> IndexEntries:
    """What ``resource`` (the JSON of ``stored``) is found by."""
    terms: set[str] = set()
    strings: set[str] = set()
    dates: dict[str, tuple[datetime, datetime]] = {}
    for param in params_of(stored.resource_type).values():
        values = [value for path in param.paths for value in _walk(resource, path.split("."))]
        if param.name == "_lastUpdated":
            dates[param.name] = (stored.last_updated, stored.last_updated + timedelta(milliseconds=1))
        elif param.type is ParamType.DATE:
            ranges = [r for value in values if (r := _value_range(value)) is not None]
            if ranges:
                dates[param.name] = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        elif param.type is ParamType.REFERENCE:
            for value in values:
                terms.update(_reference_terms(param, value))
        elif param.type is ParamType.STRING:
            for text in _strings(values):
                strings.add(f"{param.name}|{normalize(text)}")
                terms.add(f"{param.name}:exact|{text}")
        else:
            for system, code in _tokens(values):
                terms.update(token_terms(param.name, system, code))
    return IndexEntries(terms=frozenset(terms), strings=frozenset(strings), dates=dates)


def token_terms(name: str, system: str | None, code: str) -> set[str]:
    """The terms a token is found by: ``system|code``, ``system|`` and ``code`` (any system)."""
    found = {f"{name}:code|{code}", f"{name}|{system or ''}|{code}"}
    if system:
        found.add(f"{name}:system|{system}")
    return found


def reference_values(resource: Json, param: SearchParam) -> list[str]:
    """The ``Type/id`` references ``resource`` has under ``param`` (for ``_include``)."""
    found: list[str] = []
    for path in param.paths:
        for value in _walk(resource, path.split(".")):
            reference = value.get("reference") if isinstance(value, dict) else None
            if isinstance(reference, str) and _reference_type(reference) in param.targets:
                found.append(_relative(reference))
    return list(dict.fromkeys(found))


def normalize(text: str) -> str:
    """Lower case without accents, for string matching."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _walk(node: Any, steps: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, steps)
        return
    if not steps:
        if node is not None:
            yield node
        return
    if isinstance(node, dict) and steps[0] in node:
        yield from _walk(node[steps[0]], steps[1:])


def _tokens(values: Iterable[Any]) -> Iterator[tuple[str | None, str]]:
    for value in values:
        if isinstance(value, str):
            yield None, value
        elif isinstance(value, bool):
            yield None, "true" if value else "false"
        elif isinstance(value, dict):
            if "coding" in value or ("text" in value and "code" not in value):
                for coding in value.get("coding", []):
                    if coding.get("code"):
                        yield coding.get("system"), coding["code"]
            elif "code" in value:  # Coding
                yield value.get("system"), value["code"]
            elif "value" in value:  # Identifier
                yield value.get("system"), value["value"]


def _strings(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):  # HumanName
            for part in ("family", "given", "prefix", "suffix", "text"):
                item = value.get(part)
                yield from ([item] if isinstance(item, str) else item or [])


def _reference_terms(param: SearchParam, value: Any) -> set[str]:
    reference = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(reference, str) or _reference_type(reference) not in param.targets:
        return set()
    relative = _relative(reference)
    return {f"{param.name}|{relative}", f"{param.name}:id|{relative.partition('/')[2]}"}


def _reference_type(reference: str) -> str:
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return parts[-2] if len(parts) >= 2 else ""


def _relative(reference: str) -> str:
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def _value_range(value: Any) -> tuple[datetime, datetime] | None:
    if isinstance(value, str):
        try:
            return date_range(value)
        except ValueError:
            return None
    if isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = date_range(value["start"])[0] if "start" in value else datetime.min.replace(tzinfo=UTC)
        end = date_range(value["end"])[1] if "end" in value else datetime.max.replace(tzinfo=UTC)
        return start, end
    return None


_DATE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def date_range(text: str) -> tuple[datetime, datetime]:
    """The half-open UTC range [start, end) a FHIR date, dateTime or instant denotes (its precision
    sets the width: ``2023`` is the whole year). A value without a time zone is taken as UTC."""
    match = _DATE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a FHIR date or dateTime")
    parts = match.groupdict()
    year = int(parts["year"])
    if parts["month"] is None:
        start = datetime(year, 1, 1, tzinfo=UTC)
        return start, datetime(year + 1, 1, 1, tzinfo=UTC)
    month = int(parts["month"])
    if parts["day"] is None:
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return start, end
    day = int(parts["day"])
    if parts["hour"] is None:
        start = datetime(year, month, day, tzinfo=UTC)
        return start, start + timedelta(days=1)
    tz = UTC
    if parts["tz"] and parts["tz"] != "Z":
        sign = 1 if parts["tz"][0] == "+" else -1
        hours, minutes = int(parts["tz"][1:3]), int(parts["tz"][4:6])
        tz = timezone(timedelta(minutes=sign * (hours * 60 + minutes)))
    local = datetime(year, month, day, int(parts["hour"]), int(parts["minute"]), tzinfo=tz)
    if parts["second"] is None:
        width = timedelta(minutes=1)
    else:
        local = local.replace(second=int(parts["second"]))
        fraction = parts["fraction"]
        if fraction:
            digits = min(len(fraction) - 1, 6)
            local = local.replace(microsecond=int(fraction[1 : 1 + digits].ljust(6, "0")))
            width = timedelta(microseconds=10 ** (6 - digits))
        else:
            width = timedelta(seconds=1)
    start = local.astimezone(UTC)
    return start, start + width


# --- Parsing a search ----------------------------------------------------------------------------


class Summary(StrEnum):
    TRUE = "true"
    FALSE = "false"
    TEXT = "text"
    DATA = "data"
    COUNT = "count"


@dataclass(frozen=True)
class Include:
    """``_include=<source>:<param>[:<target>]`` or ``_revinclude`` of the same shape."""

    source_type: str
    param: str
    target_type: str | None = None

    def __str__(self) -> str:
        return ":".join(part for part in (self.source_type, self.param, self.target_type) if part)


@dataclass(frozen=True)
class SearchRequest:
    """A parsed search: the query, what to add to the matches, how to shape them, and the
    parameters that were used (for the Bundle's ``self`` link; ignored ones are left out)."""

    query: SearchQuery
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    elements: tuple[str, ...] = ()
    summary: Summary | None = None
    used: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = field(default=())


def parse_search(
    resource_type: str, params: Sequence[tuple[str, str]], *, strict: bool = False
) -> SearchRequest:
    """The search ``params`` (the query string's pairs, in order) ask for on ``resource_type``.

    Unknown parameters, modifiers and includes raise ``SearchError`` when ``strict``
    (``Prefer: handling=strict``) and are ignored otherwise (listed in ``ignored``); a known
    parameter with a bad value always raises.
    """
    if resource_type not in PARAMETERS:
        raise SearchError(f"{resource_type} cannot be searched")
    parser = _Parser(resource_type, params_of(resource_type), strict)
    for raw_name, value in params:
        if parser.take(raw_name, value):
            parser.used.append((raw_name, value))
    return parser.request()


@dataclass
class _Parser:
    resource_type: str
    known: Mapping[str, SearchParam]
    strict: bool
    criteria: list[Criterion] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    with_total: bool = True
    sort: tuple[SortKey, ...] = ()
    elements: tuple[str, ...] = ()
    summary: Summary | None = None

    def take(self, raw_name: str, value: str) -> bool:  # noqa: PLR0911 - one case per kind of parameter
        """Apply one parameter; False when it was ignored."""
        name, _, modifier = raw_name.partition(":")
        if name in _RESULT_HANDLERS:
            _RESULT_HANDLERS[name](self, value)
            return True
        if name in ("_include", "_revinclude"):
            include = _include(value, modifier, self.resource_type, reverse=name == "_revinclude")
            if include is None:
                return self.refuse(f"{raw_name}={value} is not supported", raw_name)
            (self.revincludes if name == "_revinclude" else self.includes).append(include)
            return True
        if name in ("_format", "_pretty"):
            return True
        if name not in self.known:
            return self.refuse(f"unknown search parameter {raw_name!r} for {self.resource_type}", raw_name)
        criterion = _criterion(self.known[name], modifier, value, raw_name)
        if criterion is None:
            return self.refuse(f"the modifier :{modifier} is not supported on {name}", raw_name)
        self.criteria.append(criterion)
        return True

    def refuse(self, message: str, raw_name: str) -> bool:
        if self.strict:
            raise SearchError(message)
        self.ignored.append(raw_name)
        return False

    def set_count(self, value: str) -> None:
        self.count = _integer("_count", value, 0, MAX_COUNT)

    def set_offset(self, value: str) -> None:
        self.offset = _integer("_offset", value, 0, None)

    def set_total(self, value: str) -> None:
        if value not in ("none", "estimate", "accurate"):
            raise SearchError(f"_total must be none, estimate or accurate, not {value!r}")
        self.with_total = value != "none"

    def set_sort(self, value: str) -> None:
        self.sort = _sort(value, self.known)

    def set_elements(self, value: str) -> None:
        self.elements = tuple(part.strip() for part in value.split(",") if part.strip())

    def set_summary(self, value: str) -> None:
        try:
            self.summary = Summary(value)
        except ValueError:
            choices = ", ".join(s.value for s in Summary)
            raise SearchError(f"_summary must be one of {choices}, not {value!r}") from None

    def request(self) -> SearchRequest:
        counting = self.summary is Summary.COUNT
        query = SearchQuery(
            resource_type=self.resource_type,
            criteria=tuple(self.criteria),
            sort=self.sort,
            count=0 if counting else self.count,
            offset=self.offset,
            with_total=self.with_total or counting,
        )
        return SearchRequest(
            query=query,
            includes=tuple(self.includes),
            revincludes=tuple(self.revincludes),
            elements=self.elements,
            summary=self.summary,
            used=tuple(self.used),
            ignored=tuple(self.ignored),
        )


_RESULT_HANDLERS: Mapping[str, Callable[[_Parser, str], None]] = {
    "_count": _Parser.set_count,
    "_offset": _Parser.set_offset,
    "_total": _Parser.set_total,
    "_sort": _Parser.set_sort,
    "_elements": _Parser.set_elements,
    "_summary": _Parser.set_summary,
}


def reference_criterion(param: str, references: Iterable[str]) -> TermCriterion:
    """Resources whose ``param`` refers to one of ``references`` (``Type/id``), for ``_revinclude``."""
    return TermCriterion(tuple(f"{param}|{reference}" for reference in references))


def _integer(name: str, value: str, low: int, high: int | None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SearchError(f"{name} must be a whole number, not {value!r}") from None
    if number < low or (high is not None and number > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SearchError(f"{name} must be {bound}, not {number}")
    return number


def _sort(value: str, known: Mapping[str, SearchParam]) -> tuple[SortKey, ...]:
    keys: list[SortKey] = []
    for part in value.split(","):
        name = part.strip()
        descending = name.startswith("-")
        name = name.removeprefix("-")
        param = known.get(name)
        if param is None or not (name in SORTABLE or param.type is ParamType.DATE):
            sortable = sorted(n for n, p in known.items() if n in SORTABLE or p.type is ParamType.DATE)
            raise SearchError(f"cannot sort by {name!r}; sortable: {', '.join(sortable)}")
        keys.append(SortKey(name, descending))
    return tuple(keys)


def _include(value: str, modifier: str, resource_type: str, *, reverse: bool) -> Include | None:
    """The include ``value`` names, or None when it is not one this server offers (``:iterate``
    is not offered)."""
    source, _, rest = value.partition(":")
    name, _, target = rest.partition(":")
    param = params_of(source).get(name) if source in PARAMETERS else None
    offered = (
        not modifier
        and param is not None
        and param.type is ParamType.REFERENCE
        and (not target or target in param.targets)
        and (
            (resource_type in param.targets and target in ("", resource_type))
            if reverse
            else source == resource_type
        )
    )
    return Include(source, name, target or None) if offered else None


def _criterion(  # noqa: PLR0911 - one case per parameter type and modifier
    param: SearchParam, modifier: str, value: str, raw_name: str
) -> Criterion | None:
    """The criterion one parameter asks for; None for a modifier this server does not offer."""
    alternatives = _split_or(value)
    if not alternatives or any(not alt for alt in alternatives):
        raise SearchError(f"{raw_name} has an empty value")
    if param.type is ParamType.TOKEN:
        if modifier not in ("", "not"):
            return None
        return TermCriterion(
            tuple(_token_term(param.name, alt) for alt in alternatives), negate=modifier == "not"
        )
    alternatives = [_unescape(alt) for alt in alternatives]
    if param.type is ParamType.DATE:
        if modifier:
            return None
        return DateCriterion(param.name, tuple(_date_comparison(raw_name, alt) for alt in alternatives))
    if param.type is ParamType.STRING:
        if modifier == "exact":
            return TermCriterion(tuple(f"{param.name}:exact|{alt}" for alt in alternatives))
        if modifier:
            return None
        return PrefixCriterion(tuple(f"{param.name}|{normalize(alt)}" for alt in alternatives))
    if param.type is ParamType.REFERENCE:
        if modifier and modifier not in param.targets:
            return None
        return TermCriterion(tuple(_reference_term(param, modifier, alt, raw_name) for alt in alternatives))
    if modifier:
        return None
    return TermCriterion(tuple(f"{param.name}:code|{alt}" for alt in alternatives))


def _split_or(value: str) -> list[str]:
    """Comma-separated alternatives (``\\,`` is a comma within a value; other escapes are kept for
    ``_unescape``, so that a token can still tell an escaped bar from its separator)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in value:
        if escaped:
            current.append("," if char == "," else "\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _token_term(name: str, value: str) -> str:
    bar = next((i for i, char in enumerate(value) if char == "|" and (i == 0 or value[i - 1] != "\\")), None)
    if bar is None:
        return f"{name}:code|{_unescape(value)}"
    system, code = _unescape(value[:bar]), _unescape(value[bar + 1 :])
    if not code:
        return f"{name}:system|{system}"
    return f"{name}|{system}|{code}"


def _unescape(value: str) -> str:
    return re.sub(r"\\([\\|$,])", r"\1", value)


def _reference_term(param: SearchParam, modifier: str, value: str, raw_name: str) -> str:
    if "/" in value:
        relative = _relative(value)
        kind = relative.partition("/")[0]
        if kind not in param.targets or (modifier and kind != modifier):
            allowed = modifier or ", ".join(param.targets)
            raise SearchError(f"{raw_name}={value}: {param.name} refers to {allowed}, not {kind}")
        return f"{param.name}|{relative}"
    if modifier:
        return f"{param.name}|{modifier}/{value}"
    if len(param.targets) == 1:
        return f"{param.name}|{param.targets[0]}/{value}"
    return f"{param.name}:id|{value}"


_PREFIXES = tuple(c.value for c in DateComparator)


def _date_comparison(raw_name: str, value: str) -> DateComparison:
    prefix = value[:2] if value[:2] in _PREFIXES else ""
    if value[:2] == "ap":
        raise SearchError(f"{raw_name}: the prefix ap is not supported")
    text = value[2:] if prefix else value
    try:
        start, end = date_range(text)
    except ValueError:
        raise SearchError(
            f"{raw_name}: {text!r} is not a date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)"
        ) from None
    return DateComparison(DateComparator(prefix or "eq"), start, end)


def matches(entries: IndexEntries, criterion: Criterion) -> bool:
    """Whether a resource indexed as ``entries`` meets ``criterion`` (the reference semantics that
    every index adapter implements, and tests compare against)."""
    if isinstance(criterion, TermCriterion):
        found = any(term in entries.terms for term in criterion.terms)
        return not found if criterion.negate else found
    if isinstance(criterion, PrefixCriterion):
        return any(s.startswith(p) for s in entries.strings for p in criterion.prefixes)
    span = entries.dates.get(criterion.param)
    return span is not None and any(date_matches(span, c) for c in criterion.comparisons)


def date_matches(span: tuple[datetime, datetime], comparison: DateComparison) -> bool:
    """Whether a resource's range ``span`` meets one prefixed date value."""
    return _DATE_TESTS[comparison.comparator](span[0], span[1], comparison.start, comparison.end)


_DATE_TESTS: Mapping[DateComparator, Callable[[datetime, datetime, datetime, datetime], bool]] = {
    DateComparator.EQ: lambda start, end, low, high: low <= start and end <= high,
    DateComparator.NE: lambda start, end, low, high: not (low <= start and end <= high),
    DateComparator.GT: lambda _start, end, _low, high: end > high,
    DateComparator.LT: lambda start, _end, low, _high: start < low,
    DateComparator.GE: lambda _start, end, low, _high: end > low,
    DateComparator.LE: lambda start, _end, _low, high: start < high,
    DateComparator.SA: lambda start, _end, _low, high: start >= high,
    DateComparator.EB: lambda _start, end, low, _high: end <= low,
}


def paging_links(
    path: str, used: list[tuple[str, str]], *, count: int, offset: int, total: int | None, found: int
) -> list[dict[str, str]]:
    """``self`` (the parameters used, as asked) and, for a paged result, ``first``/``previous``/
    ``next``/``last`` (``next`` without a total: when the page came back full)."""

    def url(pairs: list[tuple[str, str]]) -> str:
        return f"{path}?{urlencode(pairs)}" if pairs else path

    links = [{"relation": "self", "url": url(used)}]
    if count == 0:
        return links
    kept = [(name, value) for name, value in used if name not in ("_count", "_offset")]

    def page(start: int) -> str:
        return url([*kept, ("_count", str(count)), ("_offset", str(start))])

    links.append({"relation": "first", "url": page(0)})
    if offset > 0:
        links.append({"relation": "previous", "url": page(max(0, offset - count))})
    more = offset + count < total if total is not None else found == count
    if more:
        links.append({"relation": "next", "url": page(offset + count)})
    if total is not None:
        links.append({"relation": "last", "url": page(max(0, (total - 1) // count * count))})
    return links
