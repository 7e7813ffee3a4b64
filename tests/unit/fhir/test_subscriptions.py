"""Subscriptions to Lucerna's topic: what is accepted (and the precise refusals), the status the
server sets, filter matching, and the notification Bundles (checked with fhir.resources R4B)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.parameters import Parameters

from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.search import index_entries
from lucerna.fhir.store import StoredResource
from lucerna.fhir.subscriptions import (
    FILTER_CRITERIA,
    HEARTBEAT_PERIOD,
    MAX_COUNT,
    PAYLOAD_CONTENT,
    STATUS_PROFILE,
    TIMEOUT,
    TOPIC,
    Content,
    Event,
    Status,
    SubscriptionError,
    admit,
    event_notification,
    handshake,
    read_subscription,
    status_bundle,
    with_status,
)

pytestmark = pytest.mark.unit

BASE = "https://lucerna.example/fhir"
AT = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
LOINC_IMAGING = "http://loinc.org|18748-4"


def subscription(
    *filters: str, content: str | None = "id-only", status: str = "requested", **channel: Any
) -> dict[str, Any]:
    """A Subscription to the topic, as a client writes it."""
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": "sub1",
        "status": status,
        "reason": "AI results for the ward",
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://ehr.example/hook",
            "payload": "application/fhir+json",
            "header": ["Authorization: Bearer abc"],
            **channel,
        },
    }
    if filters:
        resource["_criteria"] = {"extension": [{"url": FILTER_CRITERIA, "valueString": f} for f in filters]}
    if content is not None:
        resource["channel"]["_payload"] = {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": content}]}
    return resource


def report(id: str = "r1", patient: str = "p1", code: str = "18748-4", version: int = 1) -> StoredResource:
    """A stored DiagnosticReport."""
    resource = {
        "resourceType": "DiagnosticReport",
        "id": id,
        "meta": {"versionId": str(version), "lastUpdated": "2026-11-21T09:30:05.000Z"},
        "status": "preliminary",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    body = json.dumps(resource).encode()
    moment = datetime(2026, 11, 21, 9, 30, 5, tzinfo=UTC)
    return StoredResource("DiagnosticReport", id, version, moment, canonical_sha256(resource), body)


# --- Validation ----------------------------------------------------------------------------------


def test_a_subscription_to_the_topic_is_read() -> None:
    read = read_subscription(subscription(f"DiagnosticReport?patient=Patient/p1&code={LOINC_IMAGING}"))
    assert read.id == "sub1"
    assert read.status is Status.REQUESTED
    assert read.endpoint == "https://ehr.example/hook"
    assert read.headers == {"Authorization": "Bearer abc"}
    assert read.content is Content.ID_ONLY
    assert len(read.criteria) == 2
    assert read_subscription(subscription(content=None)).content is Content.EMPTY


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"criteria": "DiagnosticReport?patient=Patient/1"},
            f"Subscription.criteria must be the topic {TOPIC}",
        ),
        ({"channel": {"type": "websocket"}}, "channel.type must be rest-hook"),
        ({"channel": {"type": "rest-hook"}}, "channel.endpoint is required"),
        ({"channel": {"type": "rest-hook", "endpoint": "ftp://x/y"}}, "must be an http(s) URL"),
        (
            {"channel": {"type": "rest-hook", "endpoint": "https://x/y", "payload": "application/json"}},
            "channel.payload must be application/fhir+json",
        ),
    ],
)
def test_what_the_server_cannot_serve_is_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SubscriptionError) as raised:
        read_subscription({**subscription(), **change})
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("filter_", "message"),
    [
        ("Observation?patient=Patient/1", "a filter must start with DiagnosticReport?"),
        ("DiagnosticReport", "a filter must start with DiagnosticReport?"),
        (
            "DiagnosticReport?category=RAD",
            "'category' cannot filter this topic; offered: patient, subject, code",
        ),
        ("DiagnosticReport?_count=5", "'_count' cannot filter this topic"),
        ("DiagnosticReport?patient=Group/1", "patient refers to Patient, not Group"),
        ("DiagnosticReport?code:text=x", "the modifier :text is not supported on code"),
        ("DiagnosticReport?status=", "status has an empty value"),
        ("DiagnosticReport?patient", "not a query string"),
    ],
)
def test_filter_criteria_are_checked_as_strict_searches(filter_: str, message: str) -> None:
    with pytest.raises(SubscriptionError) as raised:
        read_subscription(subscription(filter_))
    assert f"Subscription._criteria filter {filter_!r}" in str(raised.value)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ({"header": ["no colon here"]}, "channel.header 'no colon here' must be 'Name: value'"),
        ({"header": ["Content-Type: text/plain"]}, "cannot set Content-Type"),
        ({"extension": [{"url": HEARTBEAT_PERIOD, "valueUnsignedInt": 60}]}, "heartbeats"),
        ({"extension": [{"url": TIMEOUT, "valueUnsignedInt": 30}]}, "backport-timeout is not offered"),
    ],
)
def test_channel_options_not_offered_are_refused(channel: dict[str, Any], message: str) -> None:
    with pytest.raises(SubscriptionError) as raised:
        read_subscription(subscription(**channel))
    assert message in str(raised.value)


def test_payload_content_must_be_a_backport_code() -> None:
    with pytest.raises(SubscriptionError) as raised:
        read_subscription(subscription(content="everything"))
    assert "must be empty | id-only | full-resource, not 'everything'" in str(raised.value)


def test_max_count_is_accepted_since_a_notification_carries_one_event() -> None:
    read_subscription(subscription(extension=[{"url": MAX_COUNT, "valuePositiveInt": 1}]))


# --- Status --------------------------------------------------------------------------------------


def test_a_subscription_asked_to_run_waits_for_its_handshake() -> None:
    for asked in ("requested", "active"):
        assert admit(subscription(status=asked), None)["status"] == "requested"
    assert admit(subscription(status="off"), None)["status"] == "off"
    with pytest.raises(SubscriptionError, match="status error is set by the server"):
        admit(subscription(status="error"), None)


def test_an_active_subscription_stays_active_unless_its_channel_changes() -> None:
    running = with_status(subscription(), Status.ACTIVE)
    assert admit(subscription(status="active", reason="renamed"), running)["status"] == "active"
    moved = subscription(status="active", endpoint="https://other.example/hook")
    assert admit(moved, running)["status"] == "requested"
    stored = {
        **subscription(),
        "meta": {"versionId": "3", "lastUpdated": "2026-11-21T10:00:00Z", "tag": [{"code": "x"}]},
    }
    assert with_status(stored, Status.ACTIVE)["meta"] == {"tag": [{"code": "x"}]}
    failed = with_status(subscription(), Status.ERROR, "the endpoint refused")
    assert failed["error"] == "the endpoint refused"
    retried = admit(subscription(status="requested"), failed)
    assert retried["status"] == "requested"
    assert "error" not in retried


# --- Matching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "wanted"),
    [
        ((), True),
        (("DiagnosticReport?patient=Patient/p1",), True),
        (("DiagnosticReport?patient=p1",), True),
        (("DiagnosticReport?patient=Patient/p2",), False),
        ((f"DiagnosticReport?patient=Patient/p1&code={LOINC_IMAGING}",), True),
        (("DiagnosticReport?patient=Patient/p1&code=http://loinc.org|24627-2",), False),
        (("DiagnosticReport?code=18748-4,24627-2",), True),
        (("DiagnosticReport?subject=Patient/p1", "DiagnosticReport?status=final"), False),
        (("DiagnosticReport?subject=Patient/p1", "DiagnosticReport?status=preliminary"), True),
        (("DiagnosticReport?status:not=final",), True),
    ],
)
def test_filters_match_like_the_search_reference_semantics(filters: tuple[str, ...], wanted: bool) -> None:
    stored = report()
    entries = index_entries(stored, json.loads(stored.body or b""))
    active = read_subscription(with_status(subscription(*filters), Status.ACTIVE))
    assert active.wants(entries, AT) is wanted


def test_only_an_active_subscription_before_its_end_wants_anything() -> None:
    stored = report()
    entries = index_entries(stored, json.loads(stored.body or b""))
    assert not read_subscription(subscription()).wants(entries, AT)  # requested
    ended = read_subscription({**with_status(subscription(), Status.ACTIVE), "end": "2026-11-21T09:00:00Z"})
    assert not ended.wants(entries, AT)


# --- Bundles -------------------------------------------------------------------------------------


def status_of(bundle: Bundle) -> dict[str, Any]:
    """The first entry's Parameters, as {name: value or parts}."""
    data = json.loads(bundle.model_dump_json())
    first = data["entry"][0]
    parameters = Parameters.model_validate(first["resource"])
    assert parameters.meta is not None
    assert parameters.meta.profile == [STATUS_PROFILE]
    found: dict[str, Any] = {}
    for parameter in first["resource"]["parameter"]:
        value = {k: v for k, v in parameter.items() if k != "name"}
        found[parameter["name"]] = value
    return found


def round_trip(bundle: Bundle) -> dict[str, Any]:
    """The Bundle as sent, after checking it parses again as R4B."""
    data: dict[str, Any] = json.loads(bundle.model_dump_json())
    Bundle.model_validate(data)
    return data


def test_the_handshake_names_the_subscription_and_topic_and_has_no_event() -> None:
    sent = handshake(read_subscription(subscription()), BASE, AT)
    data = round_trip(sent)
    assert data["type"] == "history"
    assert len(data["entry"]) == 1
    assert data["entry"][0]["request"] == {"method": "GET", "url": f"{BASE}/Subscription/sub1/$status"}
    status = status_of(sent)
    assert status["subscription"] == {"valueReference": {"reference": f"{BASE}/Subscription/sub1"}}
    assert status["topic"] == {"valueCanonical": TOPIC}
    assert status["status"] == {"valueCode": "requested"}
    assert status["type"] == {"valueCode": "handshake"}
    assert status["events-since-subscription-start"] == {"valueString": "0"}
    assert "notification-event" not in status


def event_parts(status: dict[str, Any]) -> dict[str, Any]:
    return {part["name"]: part for part in status["notification-event"]["part"]}


@pytest.mark.parametrize("content", ["empty", "id-only", "full-resource"])
def test_an_event_notification_carries_what_the_payload_content_asks(content: str) -> None:
    active = read_subscription(with_status(subscription(content=content), Status.ACTIVE))
    updated = report(version=2)
    sent = event_notification(active, BASE, AT, Event(7, updated))
    data = round_trip(sent)
    status = status_of(sent)
    assert status["type"] == {"valueCode": "event-notification"}
    assert status["status"] == {"valueCode": "active"}
    assert status["events-since-subscription-start"] == {"valueString": "7"}
    parts = event_parts(status)
    assert parts["event-number"]["valueString"] == "7"
    assert parts["timestamp"]["valueInstant"].startswith("2026-11-21T09:30:05")
    focus = f"{BASE}/DiagnosticReport/r1"
    if content == "empty":
        assert "focus" not in parts
        assert len(data["entry"]) == 1
        return
    assert parts["focus"]["valueReference"] == {"reference": focus}
    [entry] = data["entry"][1:]
    assert entry["fullUrl"] == focus
    assert entry["request"] == {"method": "PUT", "url": "DiagnosticReport/r1"}
    assert entry["response"]["status"] == "200"
    if content == "id-only":
        assert "resource" not in entry
    else:
        assert entry["resource"]["resourceType"] == "DiagnosticReport"
        assert entry["resource"]["subject"] == {"reference": "Patient/p1"}


def status_of_data(data: dict[str, Any]) -> dict[str, Any]:
    return {
        p["name"]: {k: v for k, v in p.items() if k != "name"}
        for p in data["entry"][0]["resource"]["parameter"]
    }


def test_a_first_version_is_announced_as_created_and_references_are_relative_without_a_base() -> None:
    active = read_subscription(with_status(subscription(), Status.ACTIVE))
    data = round_trip(event_notification(active, "", AT, Event(1, report())))
    assert data["entry"][1]["request"] == {"method": "POST", "url": "DiagnosticReport"}
    assert data["entry"][1]["response"]["status"] == "201"
    assert "fullUrl" not in data["entry"][1]  # it would have to be absolute
    assert event_parts(status_of_data(data))["focus"]["valueReference"] == {
        "reference": "DiagnosticReport/r1"
    }


def test_the_status_bundle_is_a_searchset_of_the_query_status() -> None:
    active = read_subscription(with_status(subscription(), Status.ACTIVE))
    sent = status_bundle(active, BASE, AT, 3)
    data = round_trip(sent)
    assert data["type"] == "searchset"
    assert data["total"] == 1
    status = status_of(sent)
    assert status["type"] == {"valueCode": "query-status"}
    assert status["status"] == {"valueCode": "active"}
    assert status["events-since-subscription-start"] == {"valueString": "3"}
