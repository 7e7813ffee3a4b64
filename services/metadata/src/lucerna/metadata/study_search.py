"""Free-text study search: the search index ranks Study UIDs, the metadata store (the source of
truth) supplies each study's current study-level DICOM JSON."""

from __future__ import annotations

from collections.abc import Sequence

from lucerna.core.dicom.attributes import first_value
from lucerna.core.storage.ports import DicomJson, Match, MetadataStore, Query, SearchIndex
from lucerna.metadata.errors import InvalidRequestError
from lucerna.metadata.querying import RETRIEVE_URL
from lucerna.metadata.urls import study_url

DEFAULT_LIMIT = 20
MAX_LIMIT = 200
MAX_TEXT = 256


def parse_search(params: Sequence[tuple[str, str]]) -> tuple[str, int, int]:
    """``q``, ``limit`` and ``offset`` of a search request; 400 when missing or malformed."""
    values: dict[str, str] = {}
    for name, value in params:
        if name not in {"q", "limit", "offset"}:
            raise InvalidRequestError(f"unknown query parameter {name!r}; use q, limit and offset")
        if name in values:
            raise InvalidRequestError(f"query parameter {name!r} is given more than once")
        values[name] = value
    text = values.get("q", "").strip()
    if not text:
        raise InvalidRequestError("q (the text to search for) is required")
    if len(text) > MAX_TEXT:
        raise InvalidRequestError(f"q is longer than {MAX_TEXT} characters")
    limit = _bounded("limit", values.get("limit"), DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _bounded("offset", values.get("offset"), 0, 0, None)
    return text, limit, offset


def _bounded(name: str, raw: str | None, default: int, minimum: int, maximum: int | None) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(f"{name}: {raw!r} is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        raise InvalidRequestError(f"{name}: {value} is not between {minimum}{upper}")
    return value


async def search_studies(
    text: str, *, limit: int, offset: int, metadata: MetadataStore, search: SearchIndex, base: str
) -> list[DicomJson]:
    """Study-level DICOM JSON of the studies matching ``text``, in the index's rank order.

    A study the index still lists but the store no longer holds is left out.
    """
    uids = await search.search(text, limit=limit, offset=offset)
    if not uids:
        return []
    found = await metadata.query(
        Query(level="study", matches=(Match("StudyInstanceUID", "uids", list(uids)),), limit=len(uids))
    )
    by_uid = {str(first_value(study, "StudyInstanceUID")): study for study in found}
    results = []
    for uid in uids:
        study = by_uid.get(uid)
        if study is not None:
            study[RETRIEVE_URL] = {"vr": "UR", "Value": [study_url(base, uid)]}
            results.append(dict(sorted(study.items())))
    return results
