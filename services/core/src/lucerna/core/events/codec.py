"""Protobuf events to envelopes and back.

``encode`` wraps a message with the identifiers every event carries (message id, correlation id,
timestamp, W3C trace context); ``decode`` turns a body back into its message type and raises
``PermanentError`` on anything that is not one, so the bus dead-letters it at once.
"""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from lucerna.core.events.ports import Envelope, PermanentError

CONTENT_TYPE = "application/protobuf"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

M = TypeVar("M", bound=Message)


def new_message_id() -> str:
    """A fresh random message id."""
    return str(uuid.uuid4())


def new_traceparent() -> str:
    """A W3C traceparent starting a new, sampled trace."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str | None) -> str:
    """Continue ``parent``'s trace with a new span id; start a new trace when it is absent or invalid."""
    match = _TRACEPARENT.match(parent or "")
    if match is None or match[1] == "ff" or set(match[2]) == {"0"} or set(match[3]) == {"0"}:
        return new_traceparent()
    return f"00-{match[2]}-{secrets.token_hex(8)}-{match[4]}"


def encode(
    routing_key: str,
    message: Message,
    *,
    correlation_id: str,
    message_id: str | None = None,
    timestamp: datetime | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> Envelope:
    """The envelope of ``message``.

    ``traceparent`` is the trace context of the work that causes this event (an HTTP request, the
    envelope being handled); the event continues that trace, or starts one when there is none.
    """
    if timestamp is None:
        timestamp = datetime.now(UTC)
    elif timestamp.tzinfo is None:
        raise ValueError("event timestamps must be timezone-aware")
    headers = {TRACEPARENT: child_traceparent(traceparent)}
    if tracestate:
        headers[TRACESTATE] = tracestate
    return Envelope(
        routing_key=routing_key,
        body=message.SerializeToString(deterministic=True),
        message_id=message_id or new_message_id(),
        correlation_id=correlation_id,
        timestamp=timestamp,
        type=message.DESCRIPTOR.full_name,
        headers=headers,
    )


def decode(envelope: Envelope, message_type: type[M]) -> M:
    """The message in ``envelope``; ``PermanentError`` when it is not a valid ``message_type``.

    Fields unknown to this version (added by a newer producer) are accepted; a known field number
    with the wrong wire type is garbage, not a newer schema, and is refused.
    """
    expected = message_type.DESCRIPTOR.full_name
    if envelope.type != expected:
        raise PermanentError(f"expected a {expected} event, got type {envelope.type!r}")
    message = message_type()
    try:
        message.ParseFromString(envelope.body)
    except DecodeError as exc:
        raise PermanentError(f"body is not a valid {expected}: {exc}") from exc
    mismatch = _wire_type_mismatch(message)
    if mismatch is not None:
        raise PermanentError(f"body is not a valid {expected}: field {mismatch} has the wrong wire type")
    return message


def _wire_type_mismatch(message: Message) -> str | None:
    """The path of a field whose number is known but whose wire type is not, if any."""
    descriptor = message.DESCRIPTOR
    unknown_fields = UnknownFieldSet(message)
    for index in range(len(unknown_fields)):
        number: int = unknown_fields[index].field_number
        if number in descriptor.fields_by_number:
            return descriptor.fields_by_number[number].name
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is None:
            continue
        if entry.GetOptions().map_entry:
            values = value.values() if entry.fields_by_name["value"].message_type is not None else ()
        elif field.is_repeated:
            values = value
        else:
            values = (value,)
        for item in values:
            inner = _wire_type_mismatch(item)
            if inner is not None:
                return f"{field.name}.{inner}"
    return None
