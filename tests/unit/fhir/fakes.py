"""In-memory FHIR store and index: the ports' semantics (``search.matches`` for criteria) without a server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta

from lucerna.fhir.search import matches
from lucerna.fhir.store import (
    IndexEntries,
    ResourceWrite,
    SearchPage,
    SearchQuery,
    StoredResource,
    VersionConflictError,
    WriteOutcome,
)


class Clock:
    """A settable clock that moves on by a millisecond each time it is read."""

    def __init__(self, now: datetime = datetime(2024, 1, 1, tzinfo=UTC)) -> None:
        self.now = now

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


class FakeStore:
    """Every version of every resource in a dict."""

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock or Clock()
        self.versions: dict[tuple[str, str], list[StoredResource]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def write(self, writes: Sequence[ResourceWrite]) -> list[WriteOutcome]:
        for item in writes:
            self._check(item.resource_type, item.id, item.if_match)
        outcomes = []
        for item in writes:
            current = await self.read(item.resource_type, item.id)
            if current is not None and not current.deleted and current.sha256 == item.sha256:
                outcomes.append(WriteOutcome(current, changed=False))
                continue
            version = current.version_id + 1 if current else 1
            moment = self.clock()
            meta = {
                **item.resource.get("meta", {}),
                "versionId": str(version),
                "lastUpdated": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            }
            body = json.dumps({**item.resource, "meta": meta}, separators=(",", ":")).encode()
            stored = StoredResource(item.resource_type, item.id, version, moment, item.sha256, body)
            self.versions.setdefault((item.resource_type, item.id), []).append(stored)
            outcomes.append(WriteOutcome(stored, changed=True))
        return outcomes

    def _check(self, resource_type: str, id: str, if_match: int | None) -> None:
        history = self.versions.get((resource_type, id))
        current = history[-1].version_id if history else None
        if if_match is not None and if_match != current:
            raise VersionConflictError(f"{resource_type}/{id}", if_match, current)

    async def delete(
        self, resource_type: str, id: str, *, if_match: int | None = None
    ) -> StoredResource | None:
        self._check(resource_type, id, if_match)
        current = await self.read(resource_type, id)
        if current is None or current.deleted:
            return None
        stored = StoredResource(resource_type, id, current.version_id + 1, self.clock(), "", None)
        self.versions[(resource_type, id)].append(stored)
        return stored

    async def read(self, resource_type: str, id: str) -> StoredResource | None:
        history = self.versions.get((resource_type, id))
        return history[-1] if history else None

    async def read_many(self, references: Sequence[str]) -> list[StoredResource]:
        found = []
        for reference in references:
            resource_type, _, id = reference.partition("/")
            current = await self.read(resource_type, id)
            if current is not None and not current.deleted:
                found.append(current)
        return found

    async def vread(self, resource_type: str, id: str, version_id: int) -> StoredResource | None:
        history = self.versions.get((resource_type, id), [])
        return next((stored for stored in history if stored.version_id == version_id), None)

    async def history(
        self,
        resource_type: str,
        id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = 20,
        offset: int = 0,
    ) -> tuple[list[StoredResource], int]:
        versions = [
            stored
            for (kind, key), history in self.versions.items()
            if kind == resource_type and (id is None or key == id)
            for stored in history
            if since is None or stored.last_updated >= since
        ]
        versions.sort(key=lambda stored: (stored.last_updated, stored.version_id), reverse=True)
        return versions[offset : offset + count], len(versions)

    async def iterate_current(
        self, resource_type: str, batch: int = 500
    ) -> AsyncIterator[list[StoredResource]]:
        current = [history[-1] for (kind, _), history in self.versions.items() if kind == resource_type]
        for start in range(0, len(current), batch):
            yield current[start : start + batch]


class FakeIndex:
    """The newest version of each resource with its entries; searched by ``search.matches``."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], tuple[StoredResource, IndexEntries]] = {}
        self.searches: list[SearchQuery] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def index(self, items: Sequence[tuple[StoredResource, IndexEntries]]) -> None:
        for stored, entries in items:
            key = (stored.resource_type, stored.id)
            held = self.entries.get(key)
            if held is None or held[0].version_id <= stored.version_id:
                self.entries[key] = (stored, entries)

    async def search(self, query: SearchQuery) -> SearchPage:
        self.searches.append(query)
        found = [
            (stored, entries)
            for (kind, _), (stored, entries) in self.entries.items()
            if kind == query.resource_type
            and not stored.deleted
            and all(matches(entries, criterion) for criterion in query.criteria)
        ]
        found.sort(key=lambda item: item[0].id)
        for key in reversed(query.sort):
            with_value = [item for item in found if key.param in item[1].dates or key.param == "_id"]
            without = [item for item in found if item not in with_value]
            with_value.sort(
                key=lambda item: item[0].id if key.param == "_id" else item[1].dates[key.param][0],
                reverse=key.descending,
            )
            found = with_value + without
        page = [stored for stored, _ in found[query.offset : query.offset + query.count]]
        return SearchPage(page, len(found) if query.with_total else None)

    async def clear(self) -> None:
        self.entries.clear()
