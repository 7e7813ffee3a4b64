"""The event codec: envelopes from protobuf messages and back, garbage refused as permanent."""

import re
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from lucerna.core.events.codec import (
    child_traceparent,
    decode,
    encode,
    new_traceparent,
)
from lucerna.core.events.ports import Envelope, PermanentError
from lucerna.events.v1 import events_pb2

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


def _study_ready() -> events_pb2.StudyReady:
    return events_pb2.StudyReady(
        study_instance_uid="1.2.3",
        burst=2,
        burst_instances=10,
        total_instances=30,
        patient_id="P1",
        modalities=["CT"],
        sources=["dimse:MODALITY@10.0.0.1"],
        ready_at=Timestamp(seconds=1_700_000_000),
    )


def test_roundtrip_keeps_the_message_and_sets_every_identifier() -> None:
    message = _study_ready()
    envelope = encode("study.ready", message, correlation_id="1.2.3")
    assert envelope.routing_key == "study.ready"
    assert envelope.type == "lucerna.events.v1.StudyReady"
    assert envelope.correlation_id == "1.2.3"
    assert len(envelope.message_id) == 36
    assert envelope.timestamp.tzinfo is not None
    assert abs((datetime.now(UTC) - envelope.timestamp).total_seconds()) < 5
    assert TRACEPARENT.match(envelope.headers["traceparent"])
    assert decode(envelope, events_pb2.StudyReady) == message


def test_given_identifiers_are_kept() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    envelope = encode(
        "audit.record",
        events_pb2.AuditRecord(action=events_pb2.AuditRecord.INSTANCE_STORED, details={"k": "v"}),
        correlation_id="job-1",
        message_id="m-1",
        timestamp=at,
        tracestate="vendor=x",
    )
    assert (envelope.message_id, envelope.timestamp) == ("m-1", at)
    assert envelope.headers["tracestate"] == "vendor=x"
    assert decode(envelope, events_pb2.AuditRecord).details == {"k": "v"}


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        encode("study.ready", _study_ready(), correlation_id="c", timestamp=datetime(2026, 1, 1))


def test_fresh_ids_differ() -> None:
    first = encode("study.ready", _study_ready(), correlation_id="c")
    second = encode("study.ready", _study_ready(), correlation_id="c")
    assert first.message_id != second.message_id
    assert first.headers["traceparent"] != second.headers["traceparent"]


def test_a_caused_event_continues_the_trace_with_a_new_span() -> None:
    parent = new_traceparent()
    envelope = encode("study.ready", _study_ready(), correlation_id="c", traceparent=parent)
    child = envelope.headers["traceparent"]
    assert child.split("-")[1] == parent.split("-")[1]
    assert child.split("-")[2] != parent.split("-")[2]


@pytest.mark.parametrize(
    "parent",
    [
        "garbage",
        "00-00000000000000000000000000000000-0123456789abcdef-01",  # all-zero trace id
        "00-0123456789abcdef0123456789abcdef-0000000000000000-01",  # all-zero span id
        "ff-0123456789abcdef0123456789abcdef-0123456789abcdef-01",  # forbidden version
        "00-0123456789ABCDEF0123456789ABCDEF-0123456789abcdef-01",  # upper case
    ],
)
def test_an_invalid_parent_starts_a_new_trace(parent: str) -> None:
    child = child_traceparent(parent)
    assert TRACEPARENT.match(child)
    assert child.split("-")[1] not in parent


def test_sampled_flag_of_the_parent_is_kept() -> None:
    parent = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"
    assert child_traceparent(parent).endswith("-00")


def _envelope(body: bytes, type_: str = "lucerna.events.v1.StudyReady") -> Envelope:
    return Envelope("study.ready", body, "m", "c", datetime.now(UTC), type_)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff",  # truncated varint
        b"\x0a\x05ab",  # length beyond the end
        b"\x0a\x02\xff\xfe",  # string field that is not UTF-8
        b"\x08\x01",  # field 1 (a string) sent as a varint
        b"\x42\x03\x0a\x01x",  # ready_at.seconds (a varint) sent as a string
    ],
)
def test_garbage_is_a_permanent_error(body: bytes) -> None:
    with pytest.raises(PermanentError, match=r"not a valid lucerna\.events\.v1\.StudyReady"):
        decode(_envelope(body), events_pb2.StudyReady)


def test_the_wrong_wire_type_is_reported_by_field_path() -> None:
    with pytest.raises(PermanentError, match=r"field ready_at\.seconds has the wrong wire type"):
        decode(_envelope(b"\x42\x03\x0a\x01x"), events_pb2.StudyReady)


def test_fields_from_a_newer_schema_are_accepted() -> None:
    body = _study_ready().SerializeToString() + b"\xf8\x01\x07"  # field 31, varint 7
    assert decode(_envelope(body), events_pb2.StudyReady).study_instance_uid == "1.2.3"


def test_a_different_type_is_a_permanent_error() -> None:
    envelope = encode("study.ready", _study_ready(), correlation_id="c")
    with pytest.raises(PermanentError, match=r"expected a lucerna\.events\.v1\.AuditRecord"):
        decode(envelope, events_pb2.AuditRecord)
