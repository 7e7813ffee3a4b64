"""What every metadata endpoint does around its handler: authorise, turn domain errors into HTTP
statuses, and record the patient-data read once the answer has been sent."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lucerna.core.logging import correlation_id
from lucerna.core.service import Resources
from lucerna.core.storage.ports import StudyPatient
from lucerna.metadata.audit import PatientDataRead, publish_read
from lucerna.metadata.errors import DicomWebError
from lucerna.metadata.urls import dicomweb_base

log = logging.getLogger(__name__)


@dataclass
class Read:
    """What a successful answer disclosed, for its audit record."""

    study_uids: list[str] = field(default_factory=list)
    series_uid: str = ""
    sop_instance_uid: str = ""
    # Study UID -> its patient, where the handler holds it already (the others are looked up after).
    patients: dict[str, StudyPatient] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[tuple[Response, Read]]]


def guarded(resources: Resources, path: str, handler: Handler, name: str) -> Route:
    """A GET route that requires ImagingStudy read access and audits each successful answer."""

    async def endpoint(request: Request) -> Response:
        principal = resources.auth.require(request, "ImagingStudy", "read")
        try:
            response, read = await handler(request)
        except DicomWebError as error:
            if error.status >= 500:
                log.error("cannot answer %s: %s", request.url.path, error.message)  # noqa: TRY400 - the message says it all
            raise HTTPException(error.status, error.message) from error
        if response.status_code < 300:
            response.background = BackgroundTask(
                publish_read,
                resources.audit_trail,
                PatientDataRead(
                    actor=principal.subject,
                    route=path,
                    query=request.query_params.multi_items(),
                    study_uids=read.study_uids,
                    series_uid=read.series_uid,
                    sop_instance_uid=read.sop_instance_uid,
                    request_id=correlation_id.get() or "",
                    traceparent=request.headers.get("traceparent"),
                    patients=read.patients,
                ),
                resources.metadata,
            )
        return response

    return Route(path, endpoint, methods=["GET"], name=name)


def base_of(request: Request) -> str:
    """The DICOMweb root URL as the client reached it."""
    return dicomweb_base(str(request.base_url))


def accept_of(request: Request) -> str | None:
    """The Accept asked for; an ``accept`` query parameter overrides the header (PS3.18 8.3.3.1)."""
    values = request.query_params.getlist("accept")
    if values:
        return ", ".join(values)
    return request.headers.get("accept")


async def primed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A body whose first chunk is already produced, so that a failure before any byte is sent is
    still answered with an error status; a later failure aborts the response and is logged."""
    first = await anext(chunks)

    async def body() -> AsyncIterator[bytes]:
        yield first
        try:
            async for chunk in chunks:
                yield chunk
        except Exception:
            log.exception("a streamed response was aborted")
            raise

    return body()
