"""FHIR ``AuditEvent`` search and read of patient-data accesses, IHE BALP style (``system/AuditEvent.read``).

- ``GET /fhir/AuditEvent?patient=&agent=&entity=&date=&type=&subtype=&outcome=&action=&_count=&_offset=``:
  a searchset Bundle, newest first, with paging links. Comma-separated values are alternatives and
  repeated parameters must all hold; ``date`` takes the prefixes ``eq ge gt le lt``; ``entity`` with
  a Patient reference means ``patient``. Unknown parameters are ignored unless
  ``Prefer: handling=strict``.
- ``GET /fhir/AuditEvent/{id}``: one, by the log entry's sequence number.

An AuditEvent is rendered from its log entry and, only then, its sealed PHI opened (the patient and
the query). Its entities name the patient, the resources disclosed, the query (base64) and the log
entry itself, with its leaf hash: from there ``/api/audit/proofs/inclusion/{id}`` proves it is in
the signed log. Errors are OperationOutcomes.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from lucerna.audit.accesses import Accesses, Disclosure, PhiIntegrityError
from lucerna.audit.auditevents import QUERY, EventQuery, IndexedEvent
from lucerna.audit.log import AuditLog
from lucerna.core.pqchannel import ChannelError
from lucerna.core.service import Resources
from lucerna.fhir.outcome import FHIR_JSON, FhirError, error_response, from_http_exception
from lucerna.fhir.search import DEFAULT_COUNT, MAX_COUNT, date_range, paging_links

log = logging.getLogger(__name__)

PATH = "/fhir/AuditEvent"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DICOMWEB_INTERACTION = "urn:lucerna:audit:dicomweb-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
LOG_ENTRY_SYSTEM = "urn:lucerna:audit-log:seq"
DICOM_UID_SYSTEM = "urn:dicom:uid"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"
TYPE_DISPLAY = {"110110": "Patient Record", "110112": "Query"}
OUTCOMES = frozenset({0, 4, 8, 12})
ACTIONS = frozenset({"C", "R", "U", "D", "E"})
TOKENS = ("agent", "type", "subtype", "action", "outcome")
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
KNOWN = frozenset({"patient", "entity", "date", *TOKENS, "_count", "_offset", "_total", "_format"})


def auditevent_routes(
    resources: Resources,
    audit_log: Callable[[], AuditLog | None],
    accesses: Callable[[], Accesses | None],
    origin: str,
) -> Sequence[BaseRoute]:
    """The routes; ``audit_log`` and ``accesses`` give the running ones (None until started)."""

    def running() -> tuple[AuditLog, Accesses]:
        started_log, started = audit_log(), accesses()
        if started_log is None or started is None:
            raise FhirError(503, "the audit service is starting; try again shortly")
        return started_log, started

    def guarded(handler: Callable[[Request, AuditLog, Accesses], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                resources.auth.require(request, "AuditEvent", "read")
                response: Response = await handler(request, *running())
            except FhirError as error:
                return error_response(error)
            except HTTPException as error:
                return error_response(from_http_exception(error))
            except (PhiIntegrityError, ChannelError) as error:
                log.error("cannot render an AuditEvent: %s", error)  # noqa: TRY400 - names the entry, holds no PHI
                return error_response(FhirError(500, f"an audit entry cannot be rendered: {error}"))
            return response

        return endpoint

    async def search(request: Request, audit_log: AuditLog, running: Accesses) -> Response:
        query, used = parse_search(list(request.query_params.multi_items()), running, strict=_strict(request))
        events, total = await running.index.search(query)
        base = _base(request)
        entries = [
            {
                "fullUrl": f"{base}/AuditEvent/{event.seq}",
                "resource": await _rendered(event, audit_log, running, origin),
                "search": {"mode": "match"},
            }
            for event in events
        ]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            **({"total": total} if total is not None else {}),
            "link": paging_links(
                f"{base}/AuditEvent",
                used,
                count=query.count,
                offset=query.offset,
                total=total,
                found=len(events),
            ),
        }
        if entries:
            bundle["entry"] = entries
        return _json(bundle)

    async def read(request: Request, audit_log: AuditLog, running: Accesses) -> Response:
        id = request.path_params["id"]
        event = await running.index.get(int(id)) if id.isdigit() else None
        if event is None:
            raise FhirError(
                404, f"AuditEvent/{id} is not known (ids are log entries of patient-data accesses)"
            )
        return _json(await _rendered(event, audit_log, running, origin))

    return [
        Route(PATH, guarded(search), methods=["GET"], name="fhir-auditevent-search"),
        Route(f"{PATH}/{{id}}", guarded(read), methods=["GET"], name="fhir-auditevent-read"),
    ]


# --- Search parameters ---------------------------------------------------------------------------


def parse_search(
    pairs: Sequence[tuple[str, str]], accesses: Accesses, *, strict: bool = False
) -> tuple[EventQuery, list[tuple[str, str]]]:
    """The index query of the search parameters, and the parameters it used (for the self link)."""
    match: list[tuple[str, tuple[str | int, ...]]] = []
    since: datetime | None = None
    until: datetime | None = None
    controls: dict[str, str] = {}
    used: list[tuple[str, str]] = []
    for name, value in pairs:
        if name not in KNOWN:
            if strict:
                raise FhirError(400, f"unknown AuditEvent search parameter: {name}")
            continue
        used.append((name, value))
        if name.startswith("_"):
            controls[name] = value
            continue
        values = [part.strip() for part in value.split(",") if part.strip()]
        if not values:
            raise FhirError(400, f"{name} needs a value")
        if name == "date":
            if len(values) > 1:
                raise FhirError(400, "date takes one value per parameter; repeat it to combine bounds")
            since, until = _date_bounds(values[0], since, until)
        else:
            match.append(_criterion(name, values, accesses))
    if controls.get("_format", "json").split(";")[0].strip().lower() not in JSON_FORMATS:
        raise FhirError(406, f"_format={controls['_format']} is not served; only JSON")
    query = EventQuery(
        tuple(match),
        since,
        until,
        count=_integer("_count", controls.get("_count", str(DEFAULT_COUNT)), 0, MAX_COUNT),
        offset=_integer("_offset", controls.get("_offset", "0"), 0, None),
        with_total=controls.get("_total") != "none",
    )
    return query, used


def _criterion(name: str, values: list[str], accesses: Accesses) -> tuple[str, tuple[str | int, ...]]:
    """The index field and alternatives of one token or reference parameter."""
    if name in ("patient", "entity"):
        return _references(name, values, accesses)
    if name == "outcome":
        return name, tuple(_outcome(part) for part in values)
    if name in ("type", "subtype"):
        return name, tuple(_code(name, part) for part in values)
    if name == "action" and not set(values) <= ACTIONS:
        raise FhirError(400, f"action must be one of {', '.join(sorted(ACTIONS))}, not {values[0]!r}")
    return name, tuple(values)


def _date_bounds(
    text: str, since: datetime | None, until: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """Narrow [since, until) by one ``date`` value with its prefix."""
    prefix, value = (text[:2], text[2:]) if text[:2].isalpha() else ("eq", text)
    if prefix not in ("eq", "ge", "gt", "le", "lt"):
        raise FhirError(400, f"date: the prefix {prefix!r} is not supported here (eq, ge, gt, le, lt)")
    try:
        start, end = date_range(value)
    except ValueError:
        raise FhirError(400, f"date: {value!r} is not a FHIR date, dateTime or instant") from None
    low = {"eq": start, "ge": start, "gt": end}.get(prefix)
    high = {"eq": end, "le": end, "lt": start}.get(prefix)
    if low is not None:
        since = low if since is None else max(since, low)
    if high is not None:
        until = high if until is None else min(until, high)
    return since, until


def _references(name: str, values: list[str], accesses: Accesses) -> tuple[str, tuple[str | int, ...]]:
    """``patient`` values as blind indexes; ``entity`` values as they are, unless all are Patients."""
    references = [_relative(value, "Patient" if name == "patient" else None) for value in values]
    patients = [reference for reference in references if reference.startswith("Patient/")]
    if name == "entity" and not patients:
        return "entity", tuple(references)
    if len(patients) != len(references):
        raise FhirError(400, f"{name}: give Patient references and other resources in separate parameters")
    return "patient", tuple(accesses.keys.patient_index(patient) for patient in patients)


def _relative(value: str, default_type: str | None) -> str:
    """``Type/id`` of a reference given as ``id`` (with a default type), ``Type/id`` or an absolute URL."""
    parts = value.rstrip("/").split("/")
    if len(parts) == 1:
        if default_type is None:
            raise FhirError(400, f"entity: {value!r} is not a reference (Type/id)")
        return f"{default_type}/{value}"
    return f"{parts[-2]}/{parts[-1]}"


def _outcome(text: str) -> int:
    if not text.isdigit() or int(text) not in OUTCOMES:
        raise FhirError(400, f"outcome must be 0, 4, 8 or 12, not {text!r}")
    return int(text)


def _code(name: str, text: str) -> str:
    """The code of a ``[system|]code`` token (the system must be the one this server uses)."""
    system, bar, code = text.rpartition("|")
    allowed = {"type": (DCM,), "subtype": (RESTFUL_INTERACTION, DICOMWEB_INTERACTION)}[name]
    if bar and system and system not in allowed:
        raise FhirError(400, f"{name}: the system {system!r} is not used here ({', '.join(allowed)})")
    return code


def _integer(name: str, raw: str, low: int, high: int | None) -> int:
    if not raw.isdigit() or int(raw) < low or (high is not None and int(raw) > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise FhirError(400, f"{name} must be a whole number {bound}, not {raw!r}")
    return int(raw)


def _strict(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(part.strip().replace(" ", "") == "handling=strict" for part in prefer.split(","))


# --- Rendering -----------------------------------------------------------------------------------


async def _rendered(
    event: IndexedEvent, audit_log: AuditLog, accesses: Accesses, origin: str
) -> dict[str, Any]:
    entry = await audit_log.entry(event.seq)
    if entry is None:  # the index is derived from published entries
        raise PhiIntegrityError(f"log entry {event.seq} is indexed but not in the log")
    return render(await accesses.opened(event, entry.data, entry.leaf_hash), origin)


def render(disclosure: Disclosure, origin: str) -> dict[str, Any]:
    """The R4 AuditEvent (IHE BALP) of one access, validated by ``fhir.resources``."""
    event, record, phi = disclosure.event, disclosure.record, disclosure.phi
    query = event.type == QUERY
    patient = phi.patient if phi is not None else ""
    entities: list[dict[str, Any]] = []
    if patient:
        entities.append(_entity({"reference": patient}, "1", "Person", "1", "Patient"))
    entities += [
        _entity({"reference": reference}, "2", "System Object", "4", "Domain Resource")
        for reference in event.entities
    ]
    studies = (
        [record.study_instance_uid]
        if record.study_instance_uid
        else record.details.get("studies", "").split(",")
    )
    for uid in (*studies, record.series_instance_uid, record.sop_instance_uid):
        if uid:
            what = {"identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}}
            entities.append(_entity(what, "2", "System Object", "4", "Domain Resource"))
    asked = phi.query if phi is not None and phi.query else record.details.get("query", "")
    if query and asked:
        described = _entity(None, "2", "System Object", "24", "Query")
        described["query"] = base64.b64encode(asked.encode()).decode()
        entities.append(described)
    log_entry = _entity(
        {
            "identifier": {"system": LOG_ENTRY_SYSTEM, "value": str(event.seq)},
            "display": f"{origin} entry {event.seq}",
        },
        "2",
        "System Object",
        "13",
        "Security Resource",
    )
    log_entry["detail"] = [
        {"type": "origin", "valueString": origin},
        {"type": "key", "valueString": event.key},
        {"type": "leaf_hash", "valueBase64Binary": base64.b64encode(disclosure.leaf_hash).decode()},
        {"type": "inclusion_proof", "valueString": f"/api/audit/proofs/inclusion/{event.seq}"},
    ]
    entities.append(log_entry)
    subtype_system = DICOMWEB_INTERACTION if event.subtype in ("wado-rs", "qido-rs") else RESTFUL_INTERACTION
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(event.seq),
        "type": {"system": DCM, "code": event.type, "display": TYPE_DISPLAY[event.type]},
        "action": event.action,
        "recorded": _instant(event.recorded),
        "outcome": str(event.outcome),
        "agent": [
            {
                "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                "who": {
                    "identifier": {"value": event.agent or "unknown"},
                    "display": event.agent or "unknown",
                },
                "requestor": True,
            }
        ],
        "source": {
            "site": origin,
            "observer": {"display": f"lucerna-{event.service}" if event.service else "lucerna"},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": entities,
    }
    if event.subtype:
        resource["subtype"] = [{"system": subtype_system, "code": event.subtype}]
    if patient:
        profile = "IHE.BasicAudit.PatientQuery" if query else "IHE.BasicAudit.PatientRead"
        resource["meta"] = {"profile": [BALP + profile]}
    rendered: dict[str, Any] = json.loads(
        AuditEvent.model_validate(resource).model_dump_json(by_alias=True, exclude_none=True)
    )
    return rendered


def _entity(
    what: dict[str, Any] | None, type_code: str, type_display: str, role: str, role_display: str
) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "type": {"system": ENTITY_TYPE, "code": type_code, "display": type_display},
        "role": {"system": OBJECT_ROLE, "code": role, "display": role_display},
    }
    if what is not None:
        entity["what"] = what
    return entity


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- Bundles -------------------------------------------------------------------------------------


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _json(value: dict[str, Any]) -> Response:
    return Response(json.dumps(value, ensure_ascii=False, separators=(",", ":")), media_type=FHIR_JSON)
