"""The resources as the service layer sees them: the store (truth) and the index (derived) kept in
step. Every write indexes what it stored, also when the content was unchanged, so a redelivered
write repairs an index that missed the first one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from lucerna.fhir.search import SEARCHABLE_TYPES, index_entries
from lucerna.fhir.store import (
    IndexEntries,
    ResourceIndex,
    ResourceStore,
    ResourceWrite,
    StoredResource,
    WriteOutcome,
)


class Repository:
    """Write, delete and rebuild through one object; read through ``store`` and ``index``."""

    def __init__(self, store: ResourceStore, index: ResourceIndex) -> None:
        self.store = store
        self.index = index

    async def write(self, writes: Sequence[ResourceWrite]) -> list[WriteOutcome]:
        """Store new versions where content changed (``ResourceStore.write``), then index them."""
        outcomes = await self.store.write(writes)
        await self.index.index([(outcome.stored, entries(outcome.stored)) for outcome in outcomes])
        return outcomes

    async def delete(
        self, resource_type: str, id: str, *, if_match: int | None = None
    ) -> StoredResource | None:
        """Delete (a new version that reads as 410 Gone) and drop it from searches."""
        deleted = await self.store.delete(resource_type, id, if_match=if_match)
        if deleted is not None:
            await self.index.index([(deleted, IndexEntries())])
        return deleted

    async def rebuild_index(self) -> int:
        """Rebuild the index from the store and swap it in while searches go on (``ResourceIndex.
        rebuild``); the number of resources indexed."""
        return await self.index.rebuild(self._current())

    async def _current(self) -> AsyncIterator[list[tuple[StoredResource, IndexEntries]]]:
        for resource_type in SEARCHABLE_TYPES:
            async for batch in self.store.iterate_current(resource_type):
                yield [(stored, entries(stored)) for stored in batch]


def entries(stored: StoredResource) -> IndexEntries:
    """What a stored version is found by (nothing, for a deletion)."""
    if stored.body is None:
        return IndexEntries()
    return index_entries(stored, json.loads(stored.body))
