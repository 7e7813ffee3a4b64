"""QIDO-RS over HTTP (PS3.18 10.6): the six search resources, answered as application/dicom+json.

A search with no match answers 200 with an empty array, as CP-2473 settles it (a 204 may carry no
body, RFC 9110 15.3.5; C-FIND also reports success for zero matches).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from lucerna.core.dicom.attributes import first_value
from lucerna.core.service import Resources
from lucerna.core.storage.ports import Level
from lucerna.metadata.errors import InvalidRequestError, NotAcceptableError
from lucerna.metadata.negotiation import choose_json
from lucerna.metadata.qido import MAX_LIMIT, parse_qido
from lucerna.metadata.querying import run_qido
from lucerna.metadata.urls import PREFIX
from lucerna.metadata.web import Handler, Read, accept_of, base_of, guarded

LIMIT_WARNING = (
    f'299 lucerna "The limit asked for is above the maximum of {MAX_LIMIT} results per request;'
    ' further results can be requested with offset"'
)


def _search(level: Level, resources: Resources) -> Handler:
    async def handler(request: Request) -> tuple[Response, Read]:
        media_type = choose_json(accept_of(request))
        if media_type is None:
            raise NotAcceptableError(
                "QIDO-RS answers application/dicom+json or application/json;"
                f" Accept was {accept_of(request)!r}"
            )
        qido = parse_qido(
            level,
            request.query_params.multi_items(),
            study_uid=request.path_params.get("study"),
            series_uid=request.path_params.get("series"),
        )
        try:
            results = await run_qido(qido, resources.metadata, resources.search, base_of(request))
        except ValueError as error:  # a condition the store cannot answer
            raise InvalidRequestError(str(error)) from error
        headers = {"Warning": LIMIT_WARNING} if qido.limit_clamped else None
        studies = [str(uid) for uid in (first_value(r, "StudyInstanceUID") for r in results) if uid]
        return JSONResponse(results, media_type=media_type, headers=headers), Read(study_uids=studies)

    return handler


def qido_routes(resources: Resources) -> Sequence[BaseRoute]:
    """The QIDO-RS routes."""
    resources_by_path: list[tuple[str, Level, str]] = [
        (f"{PREFIX}/studies", "study", "qido-studies"),
        (f"{PREFIX}/series", "series", "qido-series"),
        (f"{PREFIX}/instances", "instance", "qido-instances"),
        (f"{PREFIX}/studies/{{study}}/series", "series", "qido-study-series"),
        (f"{PREFIX}/studies/{{study}}/instances", "instance", "qido-study-instances"),
        (f"{PREFIX}/studies/{{study}}/series/{{series}}/instances", "instance", "qido-series-instances"),
    ]
    return [
        guarded(resources, path, _search(level, resources), name) for path, level, name in resources_by_path
    ]
