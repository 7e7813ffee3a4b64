"""Free-text study search over HTTP: ``GET /api/studies/search?q=&limit=&offset=``."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from lucerna.core.dicom.attributes import first_value
from lucerna.core.service import Resources
from lucerna.metadata.study_search import parse_search, search_studies
from lucerna.metadata.web import Handler, Read, base_of, guarded

SEARCH_PATH = "/api/studies/search"


def _search(resources: Resources) -> Handler:
    async def handler(request: Request) -> tuple[Response, Read]:
        text, limit, offset = parse_search(request.query_params.multi_items())
        studies = await search_studies(
            text,
            limit=limit,
            offset=offset,
            metadata=resources.metadata,
            search=resources.search,
            base=base_of(request),
        )
        uids = [str(first_value(study, "StudyInstanceUID")) for study in studies]
        return JSONResponse(studies), Read(study_uids=uids)

    return handler


def search_routes(resources: Resources) -> Sequence[BaseRoute]:
    """The study search route."""
    return [guarded(resources, SEARCH_PATH, _search(resources), "study-search")]
