"""The metadata deployable: DICOMweb QIDO-RS/WADO-RS, study search, and the search indexer loop."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute

from lucerna.core.service import Resources
from lucerna.metadata.indexing import Indexer, reindex
from lucerna.metadata.qido_views import qido_routes
from lucerna.metadata.search_views import search_routes
from lucerna.metadata.wado_views import wado_routes


class MetadataService:
    """Serves reads of the imaging store and keeps the search index in step with it."""

    name = "metadata"

    def __init__(self) -> None:
        self._indexer: Indexer | None = None

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        """QIDO-RS before WADO-RS: ``/studies/{study}/series`` searches, ``.../series/{series}`` retrieves."""
        return [*qido_routes(resources), *wado_routes(resources), *search_routes(resources)]

    async def start(self, resources: Resources) -> None:
        """Start the search indexer loop."""
        self._indexer = Indexer(resources.metadata, resources.search)
        self._indexer.start()

    async def stop(self) -> None:
        """Stop the indexer loop."""
        if self._indexer is not None:
            await self._indexer.stop()
            self._indexer = None

    async def reindex(self, resources: Resources) -> str:
        """``lucerna reindex``: the study search index, rebuilt from the metadata store."""
        return f"reindexed {await reindex(resources)} studies"


SERVICE = MetadataService()
