"""The FHIR service's storage ports: versioned resources (the truth) and their search index (derived).

Adapters: ``sqlite_store`` (embedded: one SQLite file is both), ``mongo_store`` (MongoDB, within what
FerretDB v1 serves) and ``elastic_index`` (Elasticsearch). The index is rebuildable from the store;
the service indexes every version it writes (again on a redelivery, which is harmless: an index
keeps only the newest version of a resource, by ``version_id``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

Json = dict[str, Any]


class VersionConflictError(Exception):
    """``If-Match`` named a version that is no longer (or not yet) the current one."""

    def __init__(self, reference: str, expected: int, current: int | None) -> None:
        super().__init__(f"{reference} is at version {current}, not {expected}")
        self.reference = reference
        self.expected = expected
        self.current = current


@dataclass(frozen=True)
class StoredResource:
    """One version of a resource as stored.

    ``body`` is the resource's JSON (UTF-8) with ``meta.versionId`` and ``meta.lastUpdated`` set, ready
    to send; it is None for a deletion (a version too: reads of it answer 410 Gone).
    """

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime  # UTC, millisecond precision
    sha256: str  # canonical hash (``canonical.sha256``) of the content; "" for a deletion
    body: bytes | None

    @property
    def reference(self) -> str:
        """``<Type>/<id>``."""
        return f"{self.resource_type}/{self.id}"

    @property
    def deleted(self) -> bool:
        return self.body is None


@dataclass(frozen=True)
class ResourceWrite:
    """A resource to store as a new version unless its content hash equals the current version's.

    ``resource`` is the JSON without ``meta.versionId``/``meta.lastUpdated`` (the store sets them);
    ``if_match``: the version the writer saw (``If-Match``), None for an unconditional write.
    """

    resource_type: str
    id: str
    resource: Json
    sha256: str
    if_match: int | None = None


@dataclass(frozen=True)
class WriteOutcome:
    """The current version after a write, and whether the write made it (False: content unchanged)."""

    stored: StoredResource
    changed: bool


class ResourceStore(Protocol):
    """The versioned resources: every version kept, the newest one current."""

    async def start(self) -> None:
        """Connect and create what the store needs (tables, indexes)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def write(self, writes: Sequence[ResourceWrite]) -> list[WriteOutcome]:
        """Store each resource as a new version where its content changed, in order.

        SQLite writes them in one transaction. MongoDB (no transactions on FerretDB v1) writes them
        one by one, so a writer puts what others refer to first (a crash in between leaves resources
        that a redelivery completes, never a dangling reference). ``VersionConflictError`` when an
        ``if_match`` does not hold (nothing of that resource is written).
        """
        ...

    async def delete(
        self, resource_type: str, id: str, *, if_match: int | None = None
    ) -> StoredResource | None:
        """Record a deletion as the resource's next version; None when there is nothing to delete
        (unknown, or already deleted). ``VersionConflictError`` as for ``write``."""
        ...

    async def read(self, resource_type: str, id: str) -> StoredResource | None:
        """The current version (a deletion included); None when the resource never existed."""
        ...

    async def read_many(self, references: Sequence[str]) -> list[StoredResource]:
        """The current versions of ``<Type>/<id>`` references that exist and are not deleted, in the
        order asked (unknown ones left out)."""
        ...

    async def vread(self, resource_type: str, id: str, version_id: int) -> StoredResource | None: ...

    async def history(
        self,
        resource_type: str,
        id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = 20,
        offset: int = 0,
    ) -> tuple[list[StoredResource], int]:
        """Versions of one resource (``id``) or of a whole type, newest first, changed at or after
        ``since``; a page of them and how many there are in all."""
        ...

    async def load(self, resources: Sequence[StoredResource]) -> int:
        """Insert resources as they are, each as the only version of a resource not stored yet (a
        bulk load: migrations, benchmarks); others are left alone. How many were inserted."""
        ...

    def iterate_current(self, resource_type: str, batch: int = 500) -> AsyncIterator[list[StoredResource]]:
        """Every current version of a type (deletions included), ``batch`` at a time, for
        rebuilding the index."""
        ...


# --- Search --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntries:
    """What a resource is found by, extracted by ``search.index_entries``.

    ``terms`` are exact-match keys, ``<param><form>|<value>`` (``search`` builds both sides, and the
    index only compares them); ``strings`` are lower-cased, accent-free values matched by prefix,
    ``<param>|<value>``; ``dates`` are each date parameter's half-open UTC range [start, end).
    """

    terms: frozenset[str] = frozenset()
    strings: frozenset[str] = frozenset()
    dates: Mapping[str, tuple[datetime, datetime]] = field(default_factory=dict)


@dataclass(frozen=True)
class TermCriterion:
    """The resource has at least one of ``terms`` (or, with ``negate``, none of them)."""

    terms: tuple[str, ...]
    negate: bool = False


@dataclass(frozen=True)
class PrefixCriterion:
    """One of the resource's ``strings`` starts with one of ``prefixes``."""

    prefixes: tuple[str, ...]


class DateComparator(StrEnum):
    """FHIR search prefixes on dates (``ap`` is not offered)."""

    EQ = "eq"
    NE = "ne"
    GT = "gt"
    LT = "lt"
    GE = "ge"
    LE = "le"
    SA = "sa"
    EB = "eb"


@dataclass(frozen=True)
class DateComparison:
    """One prefixed date value: its comparator and the value's half-open UTC range [start, end)."""

    comparator: DateComparator
    start: datetime
    end: datetime


@dataclass(frozen=True)
class DateCriterion:
    """The resource's range of date parameter ``param`` meets one of ``comparisons`` (FHIR R4
    semantics with ranges: eq = within, ne = not within, gt = ends after the value's end, lt =
    starts before its start, ge = ends after its start, le = starts before its end, sa = starts at
    or after its end, eb = ends at or before its start). ``_lastUpdated`` is a date parameter like
    any other. A resource without a value for ``param`` never matches."""

    param: str
    comparisons: tuple[DateComparison, ...]


Criterion = TermCriterion | PrefixCriterion | DateCriterion


@dataclass(frozen=True)
class SortKey:
    """Order by a date parameter's start, ``_lastUpdated`` or ``_id``; resources without the
    parameter sort last either way."""

    param: str
    descending: bool = False


@dataclass(frozen=True)
class SearchQuery:
    """Resources of one type meeting every criterion, ordered by ``sort`` and then by id."""

    resource_type: str
    criteria: tuple[Criterion, ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int = 20
    offset: int = 0
    with_total: bool = True


@dataclass(frozen=True)
class SearchPage:
    """One page of matches (current, not deleted versions) and, if asked, how many match in all."""

    resources: list[StoredResource]
    total: int | None


class ResourceIndex(Protocol):
    """The search index: the newest version of each resource, found by its ``IndexEntries``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def index(self, items: Sequence[tuple[StoredResource, IndexEntries]]) -> None:
        """Make each version findable (a deletion: not findable) unless the index holds a newer one
        of that resource; searches see it once this returns."""
        ...

    async def search(self, query: SearchQuery) -> SearchPage: ...

    async def rebuild(self, items: AsyncIterable[Sequence[tuple[StoredResource, IndexEntries]]]) -> int:
        """Replace the whole index by ``items`` (every current resource of the store, in batches);
        the number indexed. Searches answer from the old content until the new one replaces it at
        once, and what ``index`` writes meanwhile is not lost (ADR 0020). Raises
        ``ReindexRunningError`` while another rebuild of the same index runs."""
        ...

    async def clear(self) -> None:
        """Forget everything (tests and tools; ``lucerna reindex`` uses ``rebuild``)."""
        ...
