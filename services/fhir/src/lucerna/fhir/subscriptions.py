"""Topic-based Subscriptions in R4, as the Subscriptions R5 Backport IG (STU 1.1) has them: the one
topic Lucerna offers, what a Subscription to it may ask for, and the notification Bundles it gets.

The topic ``TOPIC`` fires when a DiagnosticReport is created or updated (a new version, announced
by ``fhir.report-published``). A Subscription names it in ``criteria`` and narrows it with
``backport-filter-criteria`` extensions on ``_criteria`` (``DiagnosticReport?`` with ``patient``,
``subject``, ``code`` and ``status``; several extensions must all hold). Only the ``rest-hook``
channel with ``application/fhir+json`` is offered; ``backport-payload-content`` picks ``empty``
(the default: nothing of the report leaves unless asked), ``id-only`` or ``full-resource``.

R4 servers run the handshake themselves: a Subscription is stored ``requested``, a ``handshake``
notification goes to its endpoint, and it becomes ``active`` when the endpoint takes it or ``error``
when it does not (``notifier`` does that). This module is pure: no HTTP, no storage.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fhir.resources.R4B.bundle import Bundle
from lucerna.fhir.canonical import VOLATILE_META
from lucerna.fhir.search import SearchError, matches, parse_search
from lucerna.fhir.store import Criterion, IndexEntries, Json, StoredResource

# Lucerna's topic. A URN, like Lucerna's other systems (codes.py): there is no published
# SubscriptionTopic to resolve it to, and R4 has no SubscriptionTopic resource to serve.
TOPIC = "urn:lucerna:fhir:topic:diagnostic-report"
TOPIC_DESCRIPTION = "A DiagnosticReport was created or updated (a new version was published)"
TOPIC_RESOURCE = "DiagnosticReport"

_BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport"
SUBSCRIPTION_PROFILE = f"{_BACKPORT}/StructureDefinition/backport-subscription"
STATUS_PROFILE = f"{_BACKPORT}/StructureDefinition/backport-subscription-status-r4"
FILTER_CRITERIA = f"{_BACKPORT}/StructureDefinition/backport-filter-criteria"
PAYLOAD_CONTENT = f"{_BACKPORT}/StructureDefinition/backport-payload-content"
HEARTBEAT_PERIOD = f"{_BACKPORT}/StructureDefinition/backport-heartbeat-period"
TIMEOUT = f"{_BACKPORT}/StructureDefinition/backport-timeout"
MAX_COUNT = f"{_BACKPORT}/StructureDefinition/backport-max-count"
TOPIC_CANONICAL = f"{_BACKPORT}/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"
STATUS_OPERATION = f"{_BACKPORT}/OperationDefinition/backport-subscription-status"
IMPLEMENTATION_GUIDE = f"{_BACKPORT}/ImplementationGuide/hl7.fhir.uv.subscriptions-backport"

FHIR_JSON = "application/fhir+json"
FILTER_PARAMETERS = ("patient", "subject", "code", "status")
# Headers the server sets itself: a channel.header may not replace them.
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", "accept"})


class SubscriptionError(ValueError):
    """A Subscription this server cannot serve (422), with the element at fault named."""


class Status(StrEnum):
    """Subscription.status (R4)."""

    REQUESTED = "requested"
    ACTIVE = "active"
    ERROR = "error"
    OFF = "off"


class Content(StrEnum):
    """How much of the report a notification carries (``backport-payload-content``)."""

    EMPTY = "empty"
    ID_ONLY = "id-only"
    FULL_RESOURCE = "full-resource"


class NotificationType(StrEnum):
    """The ``type`` of a subscription status Parameters."""

    HANDSHAKE = "handshake"
    EVENT_NOTIFICATION = "event-notification"
    QUERY_STATUS = "query-status"


@dataclass(frozen=True)
class Subscription:
    """A Subscription to ``TOPIC`` as the server acts on it."""

    id: str
    status: Status
    endpoint: str
    headers: Mapping[str, str]
    content: Content
    criteria: tuple[Criterion, ...]  # all of them must hold
    end: datetime | None = None

    @property
    def reference(self) -> str:
        """``Subscription/<id>``."""
        return f"Subscription/{self.id}"

    def wants(self, entries: IndexEntries, at: datetime) -> bool:
        """Whether a report indexed as ``entries`` is news to this Subscription at ``at``."""
        if self.status is not Status.ACTIVE or (self.end is not None and at >= self.end):
            return False
        return all(matches(entries, criterion) for criterion in self.criteria)

    def channel(self) -> tuple[str, Mapping[str, str], Content]:
        """What decides whether a new version needs a new handshake."""
        return self.endpoint, self.headers, self.content


def read_subscription(resource: Json) -> Subscription:
    """The Subscription in ``resource`` (R4 JSON, already valid against the R4B model), or a
    ``SubscriptionError`` naming the first element Lucerna cannot serve."""
    criteria = resource.get("criteria")
    if criteria != TOPIC:
        raise SubscriptionError(
            f"Subscription.criteria must be the topic {TOPIC} ({TOPIC_DESCRIPTION}), the only topic "
            f"this server offers; got {criteria!r}. Narrow it with {FILTER_CRITERIA} extensions on "
            "Subscription._criteria"
        )
    criteria_found = _filters(resource.get("_criteria") or {})
    channel = resource.get("channel") or {}
    kind = channel.get("type")
    if kind != "rest-hook":
        raise SubscriptionError(
            f"Subscription.channel.type must be rest-hook (the only channel offered), not {kind!r}"
        )
    endpoint = _endpoint(channel.get("endpoint"))
    payload = channel.get("payload")
    if payload != FHIR_JSON:
        raise SubscriptionError(f"Subscription.channel.payload must be {FHIR_JSON}, not {payload!r}")
    _channel_extensions(channel.get("extension") or [])
    end = resource.get("end")
    return Subscription(
        id=str(resource.get("id") or ""),
        status=Status(resource["status"]),
        endpoint=endpoint,
        headers=_headers(channel.get("header") or []),
        content=_content(channel.get("_payload") or {}),
        criteria=criteria_found,
        end=_instant(end) if isinstance(end, str) else None,
    )


def admit(resource: Json, current: Json | None) -> Json:
    """``resource`` as it is to be stored, written by a client over ``current`` (None: a create, or
    a deleted one): validated, with the status the server sets. A Subscription asked to run
    (``requested`` or ``active``) is ``requested`` until its handshake succeeds, unless it is active
    already on the same channel; ``off`` stays off; ``error`` is the server's to set."""
    wanted = read_subscription(resource)
    if wanted.status is Status.ERROR:
        raise SubscriptionError(
            "Subscription.status error is set by the server; write requested to retry, or off to stop"
        )
    status = wanted.status
    if status is not Status.OFF:
        running = _current(current)
        keep = (
            running is not None and running.status is Status.ACTIVE and running.channel() == wanted.channel()
        )
        status = Status.ACTIVE if keep else Status.REQUESTED
    admitted = {key: value for key, value in resource.items() if key != "error"}
    admitted["status"] = status.value
    return admitted


def with_status(resource: Json, status: Status, error: str | None = None) -> Json:
    """The stored Subscription ``resource`` moved to ``status`` by the server (``error`` says why)."""
    changed = {key: value for key, value in resource.items() if key not in ("meta", "error")}
    # The store sets versionId and lastUpdated; tags and security labels stay.
    meta = {key: value for key, value in (resource.get("meta") or {}).items() if key not in VOLATILE_META}
    if meta:
        changed["meta"] = meta
    changed["status"] = status.value
    if error:
        changed["error"] = error
    return changed


# --- Notifications -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One numbered event of a Subscription: a version of a report."""

    number: int
    report: StoredResource


def handshake(subscription: Subscription, base: str, at: datetime) -> Bundle:
    """The handshake sent before a Subscription becomes active."""
    return _notification(subscription, base, at, NotificationType.HANDSHAKE, None)


def event_notification(subscription: Subscription, base: str, at: datetime, event: Event) -> Bundle:
    """The notification of one event, with as much of the report as the Subscription asked for."""
    return _notification(subscription, base, at, NotificationType.EVENT_NOTIFICATION, event)


def status_bundle(subscription: Subscription, base: str, at: datetime, events: int) -> Bundle:
    """The answer to ``$status``: a searchset of one status Parameters (``query-status``)."""
    parameters = _status_parameters(
        subscription, base, NotificationType.QUERY_STATUS, subscription.status, events
    )
    data: Json = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "type": "searchset",
        "timestamp": _timestamp(at),
        "total": 1,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": parameters,
                "search": {"mode": "match"},
            }
        ],
    }
    return Bundle.model_validate(data)


def _notification(
    subscription: Subscription,
    base: str,
    at: datetime,
    kind: NotificationType,
    event: Event | None,
) -> Bundle:
    # A handshake goes out before the Subscription is active; an event only once it is.
    status = Status.ACTIVE if event is not None else Status.REQUESTED
    parameters = _status_parameters(subscription, base, kind, status, event.number if event else 0)
    entries: list[Json] = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": parameters,
            "request": {"method": "GET", "url": f"{_url(base, subscription.reference)}/$status"},
            "response": {"status": "200"},
        }
    ]
    if event is not None:
        report = event.report
        focus = _url(base, report.reference)
        part: list[Json] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": _timestamp(report.last_updated)},
        ]
        if subscription.content is not Content.EMPTY:
            part.append({"name": "focus", "valueReference": {"reference": focus}})
            entries.append(_focus_entry(base, report, subscription.content))
        parameters["parameter"].append({"name": "notification-event", "part": part})
    data: Json = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "type": "history",
        "timestamp": _timestamp(at),
        "entry": entries,
    }
    return Bundle.model_validate(data)


def _status_parameters(
    subscription: Subscription, base: str, kind: NotificationType, status: Status, events: int
) -> Json:
    return {
        "resourceType": "Parameters",
        "id": uuid.uuid4().hex,
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": _url(base, subscription.reference)}},
            {"name": "topic", "valueCanonical": TOPIC},
            {"name": "status", "valueCode": status.value},
            {"name": "type", "valueCode": kind.value},
            # A string in R4: the count is an integer64 in R5.
            {"name": "events-since-subscription-start", "valueString": str(events)},
        ],
    }


def _focus_entry(base: str, report: StoredResource, content: Content) -> Json:
    created = report.version_id == 1
    entry: Json = {
        "request": {
            "method": "POST" if created else "PUT",
            "url": report.resource_type if created else report.reference,
        },
        "response": {"status": "201" if created else "200", "etag": f'W/"{report.version_id}"'},
    }
    if base:  # a fullUrl must be absolute: without a public base there is none to give
        entry["fullUrl"] = _url(base, report.reference)
    if content is Content.FULL_RESOURCE and report.body is not None:
        entry["resource"] = json.loads(report.body)
    return entry


def _url(base: str, reference: str) -> str:
    """An absolute reference under ``base``, or the relative one when no public base is known."""
    return f"{base.rstrip('/')}/{reference}" if base else reference


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- Validation ----------------------------------------------------------------------------------


def _current(current: Json | None) -> Subscription | None:
    if current is None:
        return None
    try:
        return read_subscription(current)
    except SubscriptionError:
        return None  # a version this server would refuse now is not running either


def _filters(criteria_element: Json) -> tuple[Criterion, ...]:
    parsed: list[Criterion] = []
    for extension in criteria_element.get("extension") or []:
        if extension.get("url") != FILTER_CRITERIA:
            continue
        text = extension.get("valueString")
        if not isinstance(text, str):
            raise SubscriptionError(
                f"Subscription._criteria: a {FILTER_CRITERIA} extension needs a valueString"
            )
        parsed += _filter(text)
    return tuple(parsed)


def _filter(text: str) -> list[Criterion]:
    where = f"Subscription._criteria filter {text!r}"
    resource_type, question, query = text.partition("?")
    if resource_type != TOPIC_RESOURCE or not question:
        raise SubscriptionError(f"{where}: a filter must start with {TOPIC_RESOURCE}? (the topic's resource)")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise SubscriptionError(f"{where}: not a query string (name=value&...)") from None
    for name, _ in pairs:
        if name.partition(":")[0] not in FILTER_PARAMETERS:
            offered = ", ".join(FILTER_PARAMETERS)
            raise SubscriptionError(f"{where}: {name!r} cannot filter this topic; offered: {offered}")
    try:
        return list(parse_search(TOPIC_RESOURCE, pairs, strict=True).query.criteria)
    except SearchError as error:
        raise SubscriptionError(f"{where}: {error}") from None


def _endpoint(endpoint: Any) -> str:
    if not isinstance(endpoint, str) or not endpoint:
        raise SubscriptionError("Subscription.channel.endpoint is required for a rest-hook")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubscriptionError(f"Subscription.channel.endpoint must be an http(s) URL, not {endpoint!r}")
    return endpoint


def _channel_extensions(extensions: Sequence[Json]) -> None:
    for extension in extensions:
        url = extension.get("url")
        if url == HEARTBEAT_PERIOD:
            raise SubscriptionError(
                "Subscription.channel: heartbeats (backport-heartbeat-period) are not offered; leave it out"
            )
        if url == TIMEOUT:
            raise SubscriptionError(
                "Subscription.channel: backport-timeout is not offered (the server's delivery timeout "
                "applies to every endpoint); leave it out"
            )
        if url == MAX_COUNT:
            # Every notification carries one event, which any backport-max-count allows.
            count = extension.get("valuePositiveInt")
            if not isinstance(count, int) or count < 1:
                raise SubscriptionError("Subscription.channel: backport-max-count needs a valuePositiveInt")


def _headers(headers: Sequence[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for header in headers:
        name, colon, value = header.partition(":")
        name = name.strip()
        if not colon or not name or any(c in name for c in " \t\r\n") or any(c in value for c in "\r\n"):
            raise SubscriptionError(f"Subscription.channel.header {header!r} must be 'Name: value'")
        if name.lower() in RESERVED_HEADERS:
            raise SubscriptionError(f"Subscription.channel.header cannot set {name}: the server sets it")
        parsed[name] = value.strip()
    return parsed


def _content(payload_element: Json) -> Content:
    for extension in payload_element.get("extension") or []:
        if extension.get("url") == PAYLOAD_CONTENT:
            code = extension.get("valueCode")
            try:
                return Content(code)
            except ValueError:
                choices = " | ".join(c.value for c in Content)
                raise SubscriptionError(
                    f"Subscription.channel._payload: backport-payload-content must be {choices}, not {code!r}"
                ) from None
    return Content.EMPTY
