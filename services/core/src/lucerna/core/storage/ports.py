"""The storage ports of the imaging store: blobs, metadata (source of truth) and the search index.

Adapters: ``blobs`` (filesystem), ``sqlite`` (embedded metadata + FTS5 search), ``mongo`` (MongoDB),
``elastic`` (Elasticsearch). The domain code of ingestion and metadata depends only on this module.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

DicomJson = dict[str, Any]
"""A data set in the DICOM JSON model (PS3.18 F.2): ``{"0010 0010" tag: {"vr": .., "Value": [..]}}``."""


@dataclass(frozen=True)
class BlobRef:
    """Where an instance's bytes live: addressed by their SHA-256."""

    sha256: str
    size: int
    created: bool  # False when identical bytes were already stored


class BlobStore(Protocol):
    """Content-addressed storage of instance bytes; writes are atomic (no partial file is ever visible)."""

    async def put(self, data: bytes) -> BlobRef: ...

    async def get(self, sha256: str) -> bytes:
        """The stored bytes; raises ``KeyError`` when absent."""
        ...

    async def delete(self, sha256: str) -> None: ...

    async def exists(self, sha256: str) -> bool: ...


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance: its identity, its bytes' address, and its header as DICOM JSON.

    ``dataset`` is the full header in DICOM JSON without bulk data: Pixel Data and any other binary
    element larger than 1 KiB is kept as ``{"vr": VR}`` alone (its bytes stay in the blob).
    ``attributes`` are the derived, normalised fields used for matching (see ``dicom.attributes``).
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str
    size: int
    source: str  # "dimse:<calling AE>@<host>" or "stow:<client>"
    received_at: datetime
    dataset: DicomJson
    attributes: dict[str, Any] = field(default_factory=dict)


class PutOutcome(enum.Enum):
    """What an instance upsert did."""

    CREATED = "created"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changed
    CONFLICT = "conflict"  # same SOP Instance UID, different bytes: refused, nothing changed


Level = Literal["study", "series", "instance"]


@dataclass(frozen=True)
class Match:
    """One matching condition of a QIDO-RS query on a derived attribute (``dicom.attributes`` names).

    kind: ``uids`` (value: list of exact strings, OR), ``exact`` (single value), ``wildcard``
    (value with ``*`` / ``?``, case-insensitive for person names), ``range`` (value: (low, high), either
    may be None; dates as YYYYMMDD, times as HHMMSS), ``fuzzy`` (value: a person name; the adapter
    answers with names close to it, e.g. the search index's edit-distance match).
    """

    attribute: str
    kind: Literal["uids", "exact", "wildcard", "range", "fuzzy"]
    value: Any


@dataclass(frozen=True)
class StudyPatient:
    """A study's patient as DICOM names it (``derive``'s values; "" when not sent)."""

    patient_id: str
    issuer_of_patient_id: str = ""


@dataclass(frozen=True)
class Query:
    """A QIDO-RS query resolved to matching conditions at one level."""

    level: Level
    matches: Sequence[Match] = ()
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class ReadyStudy:
    """A study whose burst is complete: boundary seen and quiet for the configured period (or, with
    no boundary, idle for longer than the configured maximum)."""

    study_uid: str
    burst: int  # increases by one per burst of the same study
    burst_instances: int  # instances stored in this burst
    total_instances: int
    patient_id: str | None
    modalities: tuple[str, ...]
    sources: tuple[str, ...]


class MetadataStore(Protocol):
    """The source of truth for studies, series and instances.

    Writes use single-document atomicity only (no multi-document transactions) so that both
    MongoDB 7 and FerretDB serve them; every write is idempotent when repeated.
    """

    async def start(self) -> None:
        """Connect and create what the store needs (tables, indexes)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the backing server answers (used by /readyz)."""
        ...

    async def put_instances(self, records: Sequence[InstanceRecord]) -> list[PutOutcome]:
        """Upsert instances keyed by SOP Instance UID, one outcome per record, in order.

        Maintains the study and series aggregates (counts, modalities in study) and the study's
        assembly outbox: every CREATED instance joins the study's open burst (or opens the next one
        when the last was claimed), clears its boundary flag and sets its last-arrival time, and
        marks the study for re-indexing. Every CREATED instance is also put in the audit outbox
        (``pending_audit``) by the same write, so its audit record survives a crash or a bus outage.
        """
        ...

    async def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None: ...

    async def list_instances(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> list[InstanceRecord]:
        """The instances of a study (optionally one series or one instance), ordered by
        series number, instance number, SOP Instance UID."""
        ...

    async def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove one instance, its pending audit record, and update the aggregates and the open burst."""
        ...

    async def query(self, query: Query) -> list[DicomJson]:
        """QIDO-RS matching at ``query.level``; returns DICOM JSON with the level's attributes
        (study level adds ModalitiesInStudy, NumberOfStudyRelatedSeries/Instances; series level
        NumberOfSeriesRelatedInstances). ``fuzzy`` matches are resolved by the caller into ``uids``."""
        ...

    async def study_patients(self, study_uids: Sequence[str]) -> dict[str, StudyPatient]:
        """The patient of each stored study named (studies not stored are left out): one read of
        the study rows, for the audit records of QIDO-RS answers."""
        ...

    async def mark_boundary(self, study_uids: Sequence[str], at: datetime) -> None:
        """An association ended or a STOW-RS request completed for these studies (their open bursts)."""
        ...

    async def claim_ready(
        self, now: datetime, *, quiet: timedelta, max_idle: timedelta, lease: timedelta, limit: int = 100
    ) -> list[ReadyStudy]:
        """Claim the ended bursts: boundary set and last arrival more than ``quiet`` before ``now``,
        or no boundary and last arrival more than ``max_idle`` before ``now`` (the boundary was
        missed: a process died, an association never ended).

        A claim is a lease taken at ``now``: the burst stays in the outbox until ``ack_ready``, and
        a claim older than ``lease`` is claimable again (its claimer died before publishing). Among
        concurrent callers a burst is handed to one only, until its lease expires.
        """
        ...

    async def ack_ready(self, study_uid: str, burst: int) -> None:
        """The claimed burst's ``study.ready`` is published: remove it from the outbox for good."""
        ...

    async def pending_audit(self, stored_before: datetime, limit: int = 100) -> list[InstanceRecord]:
        """Instances stored before ``stored_before`` whose audit record is not yet published (the
        audit outbox), oldest first."""
        ...

    async def clear_audit(self, sop_instance_uids: Sequence[str]) -> None:
        """These instances' audit records are published: remove them from the audit outbox."""
        ...

    async def studies_to_index(self, limit: int = 500) -> list[tuple[DicomJson, int]]:
        """Study-level DICOM JSON of studies changed since last indexed, with their change version.

        A study removed since (its last instance deleted) comes as a tombstone (``_search.tombstone``:
        its UID and NumberOfStudyRelatedInstances 0), which the search index drops."""
        ...

    async def mark_indexed(self, versions: Sequence[tuple[str, int]]) -> None:
        """Clear the re-index mark of (study UID, version) pairs unless the study changed since."""
        ...

    def iter_studies(self) -> AsyncIterator[DicomJson]:
        """Every study at study level (for ``lucerna reindex``)."""
        ...

    async def index_lag_seconds(self) -> float:
        """Age of the oldest study change not yet in the search index (0 when none)."""
        ...


class ReindexRunningError(RuntimeError):
    """Another rebuild of the same search index is running (or was killed and left its lock)."""


class SearchIndex(Protocol):
    """Derived, rebuildable full-text and fuzzy index over studies (patient name, ids, descriptions)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def index_studies(self, studies: Sequence[DicomJson]) -> None:
        """Add or replace study documents (keyed by Study Instance UID); drop those of tombstones."""
        ...

    async def query_studies(self, query: Query) -> list[DicomJson] | None:
        """A study-level QIDO-RS query answered as ``MetadataStore.query`` would, from the index's
        copy of each study's study-level DICOM JSON (near-real-time: as of the last indexing).

        None: this index does not answer structured queries, or not this one; ask the store."""
        ...

    async def fuzzy_patient_names(self, name: str, limit: int = 1000) -> list[str]:
        """Study Instance UIDs whose patient name is close to ``name`` (typos, case, name order)."""
        ...

    async def search(self, text: str, limit: int = 50, offset: int = 0) -> list[str]:
        """Study Instance UIDs ranked for a free-text query over names, ids and descriptions."""
        ...

    async def rebuild(self, studies: AsyncIterable[DicomJson]) -> int:
        """Replace the whole index by ``studies`` (the store's, for ``lucerna reindex``); the number
        indexed. Searches answer from the old content until the new one replaces it at once, and
        what ``index_studies`` writes meanwhile is not lost (ADR 0020). Raises
        ``ReindexRunningError`` while another rebuild of the same index runs."""
        ...

    async def reset(self) -> None:
        """Empty the index (tests and tools; ``lucerna reindex`` uses ``rebuild``)."""
        ...
