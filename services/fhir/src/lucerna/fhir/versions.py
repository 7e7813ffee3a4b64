"""How versions are numbered, timed and written: shared by the store and index adapters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from lucerna.fhir.store import StoredResource, VersionConflictError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
MILLISECOND = timedelta(milliseconds=1)


def check_if_match(resource_type: str, id: str, if_match: int | None, current: StoredResource | None) -> None:
    """``VersionConflictError`` unless ``if_match`` is None or the current version."""
    if if_match is not None and (current is None or current.version_id != if_match):
        current_version = None if current is None else current.version_id
        raise VersionConflictError(f"{resource_type}/{id}", if_match, current_version)


def next_version(current: StoredResource | None, now: datetime) -> tuple[int, datetime]:
    """The version id and time of the version after ``current``: ``now`` in whole milliseconds, or
    one millisecond after ``current`` when the clock has not moved past it (strictly increasing)."""
    now = now.astimezone(UTC).replace(microsecond=now.microsecond // 1000 * 1000)
    if current is None:
        return 1, now
    return current.version_id + 1, max(now, current.last_updated + MILLISECOND)


def body_with_meta(resource: dict[str, Any], version_id: int, last_updated: datetime) -> bytes:
    """The resource as stored: compact UTF-8 JSON with ``meta.versionId`` and ``meta.lastUpdated``."""
    meta = {**resource.get("meta", {}), "versionId": str(version_id), "lastUpdated": instant(last_updated)}
    return json.dumps({**resource, "meta": meta}, separators=(",", ":"), ensure_ascii=False).encode()


def instant(moment: datetime) -> str:
    """A FHIR instant in UTC with milliseconds: ``2026-11-21T10:00:00.123Z``."""
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def milliseconds_ceiling(moment: datetime) -> datetime:
    """The first whole millisecond at or after ``moment`` (``since`` may carry microseconds)."""
    return EPOCH - (EPOCH - moment) // MILLISECOND * MILLISECOND


def microseconds(moment: datetime) -> int:
    """Epoch microseconds (exact, also for ``datetime.min``/``max``)."""
    return (moment - EPOCH) // MICROSECOND
