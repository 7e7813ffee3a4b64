"""Search-index maintenance: a loop that copies changed studies from the metadata store (the truth)
into the search index (derived), and ``reindex``, which rebuilds the index from the store and swaps
it in while searches go on (ADR 0020).

The loop is safe to run in every replica at once: the store hands out change versions and clears a
study's mark only if it did not change again meanwhile, and indexing a study twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from lucerna.core.storage.ports import DicomJson, MetadataStore, SearchIndex

if TYPE_CHECKING:
    from lucerna.core.service import Resources

log = logging.getLogger(__name__)

INDEX_LAG = Gauge(  # every worker measures the one shared store: the latest measurement (ADR 0021)
    "lucerna_search_index_lag_seconds",
    "Age of the oldest study change not yet in the search index",
    multiprocess_mode="livemostrecent",
)
INDEXED = Counter("lucerna_search_indexed_studies_total", "Study documents written to the search index")
INDEX_FAILURES = Counter(
    "lucerna_search_index_failures_total", "Indexing rounds that failed and will be retried"
)

# Study-level attribute searches are answered by the index (ADR 0004): poll often, the outbox is small.
INTERVAL_SECONDS = 0.25
BATCH = 500
MAX_BATCHES_PER_ROUND = 20  # a store changing faster than this is caught up over several rounds


async def index_changes(metadata: MetadataStore, search: SearchIndex, batch: int = BATCH) -> int:
    """Index the studies changed since they were last indexed; the number of studies written."""
    total = 0
    for _ in range(MAX_BATCHES_PER_ROUND):
        pending = await metadata.studies_to_index(limit=batch)
        if not pending:
            return total
        await search.index_studies([study for study, _ in pending])
        await metadata.mark_indexed([(_study_uid(study), version) for study, version in pending])
        INDEXED.inc(len(pending))
        total += len(pending)
        if len(pending) < batch:
            return total
    return total


def _study_uid(study: DicomJson) -> str:
    values = study.get("0020000D", {}).get("Value") or [""]
    return str(values[0])


class Indexer:
    """The background loop: one round every ``interval`` seconds; a failed round is retried next time."""

    def __init__(
        self, metadata: MetadataStore, search: SearchIndex, interval: float = INTERVAL_SECONDS
    ) -> None:
        self.metadata = metadata
        self.search = search
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        """Start the loop in the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="search-indexer")

    async def stop(self) -> None:
        """Stop the loop (a round in progress is cancelled; its studies stay marked for the next run)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> int:
        """One round: index the changes, then publish the lag."""
        count = await index_changes(self.metadata, self.search)
        INDEX_LAG.set(await self.metadata.index_lag_seconds())
        return count

    async def _run(self) -> None:
        while True:
            try:
                count = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                INDEX_FAILURES.inc()
                if not self._failing:
                    log.exception("search indexing failed; retrying every %.1f s", self.interval)
                self._failing = True
                await self._update_lag()
            else:
                if self._failing:
                    log.info("search indexing recovered")
                self._failing = False
                if count:
                    log.debug("indexed %d studies", count)
            await asyncio.sleep(self.interval)

    async def _update_lag(self) -> None:
        with contextlib.suppress(Exception):
            INDEX_LAG.set(await self.metadata.index_lag_seconds())


async def rebuild(metadata: MetadataStore, search: SearchIndex) -> int:
    """Replace the index's content by every study of the store, without an empty moment (the index
    swaps in its new content at once: ``SearchIndex.rebuild``); the number of studies."""
    count = await search.rebuild(metadata.iter_studies())
    INDEXED.inc(count)
    return count


async def reindex(resources: Resources) -> int:
    """``lucerna reindex``: start the store and the index, rebuild, close them; the number of studies."""
    await resources.metadata.start()
    try:
        await resources.search.start()
        try:
            count = await rebuild(resources.metadata, resources.search)
            log.info("search index rebuilt", extra={"studies": count})
            return count
        finally:
            await resources.search.close()
    finally:
        await resources.metadata.close()
