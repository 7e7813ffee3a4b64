"""WADO-RS over HTTP (PS3.18 10.4): studies, series and instances as multipart/related DICOM,
their metadata as DICOM JSON, frames, and bulk data."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from lucerna.core.service import Resources
from lucerna.core.storage.ports import InstanceRecord, StudyPatient
from lucerna.metadata import multipart
from lucerna.metadata.errors import NotAcceptableError
from lucerna.metadata.frames import OCTET_STREAM, parse_frame_list
from lucerna.metadata.negotiation import DICOM, choose_json, parse_accept
from lucerna.metadata.urls import PREFIX
from lucerna.metadata.wado import (
    ensure_pixel_record,
    find_instances,
    frame_parts,
    instance_metadata,
    instance_parts,
    load_bulkdata,
    load_frames,
    negotiate_frames,
    negotiate_instances,
    read_blob,
)
from lucerna.metadata.web import Handler, Read, accept_of, base_of, guarded, primed

STUDY = f"{PREFIX}/studies/{{study}}"
SERIES = f"{STUDY}/series/{{series}}"
INSTANCE = f"{SERIES}/instances/{{instance}}"


def _uids(request: Request) -> tuple[str, str | None, str | None]:
    params = request.path_params
    return params["study"], params.get("series"), params.get("instance")


def _read(request: Request, records: Sequence[InstanceRecord]) -> Read:
    """What was served, with the study's patient as the records served name it (no other read)."""
    study, series, instance = _uids(request)
    attributes = records[0].attributes if records else {}
    patient = StudyPatient(
        str(attributes.get("PatientID") or ""), str(attributes.get("IssuerOfPatientID") or "")
    )
    return Read(
        study_uids=[study],
        series_uid=series or "",
        sop_instance_uid=instance or "",
        patients={study: patient},
    )


def _retrieve(resources: Resources) -> Handler:
    async def handler(request: Request) -> tuple[Response, Read]:
        records = await find_instances(resources.metadata, *_uids(request))
        representation = negotiate_instances(accept_of(request), records)
        base = base_of(request)
        if not representation.multipart:
            data = await read_blob(resources.blobs, records[0])
            media_type = f"{DICOM}; transfer-syntax={records[0].transfer_syntax_uid}"
            return Response(data, media_type=media_type), _read(request, records)
        boundary = multipart.new_boundary()
        chunks = multipart.stream_parts(instance_parts(resources.blobs, records, base), boundary)
        body = await primed(chunks)
        return (
            StreamingResponse(body, media_type=multipart.content_type(DICOM, boundary)),
            _read(request, records),
        )

    return handler


def _metadata(resources: Resources) -> Handler:
    async def handler(request: Request) -> tuple[Response, Read]:
        media_type = choose_json(accept_of(request))
        if media_type is None:
            raise NotAcceptableError(
                f"metadata is answered as application/dicom+json or application/json; Accept was"
                f" {accept_of(request)!r}"
            )
        records = await find_instances(resources.metadata, *_uids(request))
        body = instance_metadata(records, base_of(request))
        return JSONResponse(body, media_type=media_type), _read(request, records)

    return handler


def _frames(resources: Resources) -> Handler:
    async def handler(request: Request) -> tuple[Response, Read]:
        numbers = parse_frame_list(request.path_params["frames"])
        [record] = await find_instances(resources.metadata, *_uids(request))
        ensure_pixel_record(record)
        frames = await load_frames(resources.blobs, record)
        selected = frames.select(numbers)
        negotiate_frames(accept_of(request), frames)
        return _multipart(frame_parts(frames, selected), frames.media_type), _read(request, [record])

    return handler


def _bulkdata(resources: Resources) -> Handler:
    async def handler(request: Request) -> tuple[Response, Read]:
        [record] = await find_instances(resources.metadata, *_uids(request))
        parts, frames = await load_bulkdata(resources.blobs, record, request.path_params["path"])
        if frames is not None:
            negotiate_frames(accept_of(request), frames)
            return _multipart(parts, frames.media_type), _read(request, [record])
        _negotiate_octets(accept_of(request))
        return _multipart(parts, OCTET_STREAM), _read(request, [record])

    return handler


def _negotiate_octets(accept: str | None) -> None:
    for media_range in parse_accept(accept):
        if media_range.type == "*" or media_range.media_type in {"multipart/*", "multipart/related"}:
            inner = media_range.params.get("type", OCTET_STREAM).lower()
            if inner in {OCTET_STREAM, "application/*", "*/*"}:
                return
    raise NotAcceptableError(
        f'bulk data is answered as multipart/related; type="{OCTET_STREAM}"; Accept was {accept!r}'
    )


def _multipart(parts: Sequence[multipart.Part], part_type: str) -> Response:
    boundary = multipart.new_boundary()
    return Response(
        multipart.encode_parts(parts, boundary), media_type=multipart.content_type(part_type, boundary)
    )


def wado_routes(resources: Resources) -> Sequence[BaseRoute]:
    """The WADO-RS routes."""
    retrieve, metadata = _retrieve(resources), _metadata(resources)
    return [
        guarded(resources, STUDY, retrieve, "wado-study"),
        guarded(resources, SERIES, retrieve, "wado-series"),
        guarded(resources, INSTANCE, retrieve, "wado-instance"),
        guarded(resources, f"{STUDY}/metadata", metadata, "wado-study-metadata"),
        guarded(resources, f"{SERIES}/metadata", metadata, "wado-series-metadata"),
        guarded(resources, f"{INSTANCE}/metadata", metadata, "wado-instance-metadata"),
        guarded(resources, f"{INSTANCE}/frames/{{frames}}", _frames(resources), "wado-frames"),
        guarded(resources, f"{INSTANCE}/bulkdata/{{path:path}}", _bulkdata(resources), "wado-bulkdata"),
    ]
