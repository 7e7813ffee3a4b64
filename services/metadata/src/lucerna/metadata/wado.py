"""WADO-RS retrieval (PS3.18 10.4) over the ports: instances as stored, metadata with BulkDataURIs,
frames and bulk data. Lucerna never transcodes: a client gets the stored transfer syntax or a 406."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from lucerna.core.storage.ports import BlobStore, DicomJson, InstanceRecord, Match, MetadataStore, Query
from lucerna.metadata.bulkdata import (
    PIXEL_DATA_TAGS,
    as_little_endian,
    element_value,
    read_dataset,
    with_bulkdata_uris,
)
from lucerna.metadata.errors import NotAcceptableError, NotFoundError, StoredDataError
from lucerna.metadata.frames import OCTET_STREAM, PixelFrames, pixel_frames
from lucerna.metadata.multipart import Part
from lucerna.metadata.negotiation import DICOM, accepted_transfer_syntax, is_multipart, parse_accept
from lucerna.metadata.urls import bulkdata_url, instance_url


async def find_instances(
    metadata: MetadataStore,
    study_uid: str,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[InstanceRecord]:
    """The stored instances a WADO-RS URL names; 404 with what was not found."""
    if sop_instance_uid is not None:
        record = await metadata.get_instance(sop_instance_uid)
        if record is None:
            raise NotFoundError(f"instance {sop_instance_uid} is not stored")
        if record.study_uid != study_uid or (series_uid is not None and record.series_uid != series_uid):
            raise NotFoundError(
                f"instance {sop_instance_uid} is not in series {series_uid} of study {study_uid}"
                f" (it belongs to series {record.series_uid} of study {record.study_uid})"
            )
        return [record]
    records = await metadata.list_instances(study_uid, series_uid)
    if not records:
        if series_uid is None:
            raise NotFoundError(f"study {study_uid} is not stored")
        study = Query(level="study", matches=(Match("StudyInstanceUID", "uids", [study_uid]),), limit=1)
        if not await metadata.query(study):
            raise NotFoundError(f"study {study_uid} is not stored")
        raise NotFoundError(f"series {series_uid} is not in study {study_uid}")
    return records


@dataclass(frozen=True)
class InstanceRepresentation:
    """How instances are sent: in a multipart/related body or, for one instance, as application/dicom."""

    multipart: bool


def negotiate_instances(accept: str | None, records: Sequence[InstanceRecord]) -> InstanceRepresentation:
    """The first acceptable representation of these instances in their stored syntaxes; 406 if none.

    A range without a ``transfer-syntax`` parameter is served in the stored syntax (each part says
    which), as if it had asked for ``*``: the standard's default, Explicit VR Little Endian, would
    need transcoding, which Lucerna does not do. A named syntax must be the stored one.
    """
    stored = sorted({record.transfer_syntax_uid for record in records})
    asked: list[str] = []
    for media_range in parse_accept(accept):
        syntax = accepted_transfer_syntax(media_range, DICOM)
        if syntax is None:
            asked.append(media_range.media_type)
            continue
        multipart = is_multipart(media_range)
        if not multipart and len(records) != 1:
            asked.append(media_range.media_type)
            continue
        if syntax == "*" or stored == [syntax]:
            return InstanceRepresentation(multipart=multipart)
        asked.append(f"{media_range.media_type} in {syntax}")
    raise NotAcceptableError(
        "Lucerna sends instances in the transfer syntax they were stored in and does not transcode;"
        f" stored: {', '.join(stored)}; asked: {', '.join(asked) or 'nothing usable'}."
        ' Ask for multipart/related; type="application/dicom"; transfer-syntax=*'
        + (f" (or transfer-syntax={stored[0]})" if len(stored) == 1 else "")
    )


async def read_blob(blobs: BlobStore, record: InstanceRecord) -> bytes:
    """An instance's stored bytes, checked against their SHA-256."""
    try:
        data = await blobs.get(record.sha256)
    except KeyError as missing:
        raise StoredDataError(f"the bytes of instance {record.sop_instance_uid} are missing") from missing
    if await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest()) != record.sha256:
        raise StoredDataError(f"the bytes of instance {record.sop_instance_uid} do not match their SHA-256")
    return data


async def instance_parts(
    blobs: BlobStore, records: Sequence[InstanceRecord], base: str
) -> AsyncIterator[Part]:
    """Each instance as one application/dicom part, read from the blob store only when its turn comes."""
    for record in records:
        data = await read_blob(blobs, record)
        location = instance_url(base, record.study_uid, record.series_uid, record.sop_instance_uid)
        yield Part(
            f"{DICOM}; transfer-syntax={record.transfer_syntax_uid}", data, (("Content-Location", location),)
        )


def instance_metadata(records: Sequence[InstanceRecord], base: str) -> list[DicomJson]:
    """The instances' headers as DICOM JSON, bulk data replaced by BulkDataURIs."""
    out = []
    for record in records:

        def uri_for(path: str, record: InstanceRecord = record) -> str:
            return bulkdata_url(base, record.study_uid, record.series_uid, record.sop_instance_uid, path)

        out.append(with_bulkdata_uris(record.dataset, uri_for))
    return out


async def load_frames(blobs: BlobStore, record: InstanceRecord) -> PixelFrames:
    """All frames of one instance."""
    data = await read_blob(blobs, record)

    def split() -> PixelFrames:
        return pixel_frames(read_dataset(data), record.transfer_syntax_uid)

    return await asyncio.to_thread(split)


def negotiate_frames(accept: str | None, frames: PixelFrames) -> None:
    """Check that the client accepts the frames as stored (compressed frames in their own format,
    native frames as little-endian octet streams); 406 otherwise."""
    asked: list[str] = []
    for media_range in parse_accept(accept):
        if not is_multipart(media_range):
            asked.append(media_range.media_type)
            continue
        own = accepted_transfer_syntax(media_range, frames.media_type)
        if own is not None and own in {"*", frames.part_transfer_syntax}:
            return
        # Compressed frames may also be sent as octet streams when any transfer syntax will do.
        if (
            frames.encapsulated
            and accepted_transfer_syntax(media_range, OCTET_STREAM) == "*"
            and (media_range.params.get("transfer-syntax") == "*")
        ):
            return
        asked.append(media_range.media_type + "".join(f"; {k}={v}" for k, v in media_range.params.items()))
    raise NotAcceptableError(
        f"the frames are stored as {frames.media_type} in transfer syntax {frames.part_transfer_syntax} and"
        f" Lucerna does not transcode; asked: {', '.join(asked) or 'nothing usable'}."
        f' Ask for multipart/related; type="{frames.media_type}"'
        f"; transfer-syntax={frames.part_transfer_syntax} (or transfer-syntax=*)"
    )


def frame_parts(frames: PixelFrames, selected: Sequence[bytes]) -> list[Part]:
    """The selected frames as parts labelled with their media type and transfer syntax."""
    label = f"{frames.media_type}; transfer-syntax={frames.part_transfer_syntax}"
    return [Part(label, frame) for frame in selected]


async def load_bulkdata(
    blobs: BlobStore, record: InstanceRecord, path: str
) -> tuple[list[Part], PixelFrames | None]:
    """The parts answering a bulk data URI: top-level pixel data as its frames (one part per
    compressed frame, one part for native pixels), any other element as one octet stream."""
    data = await read_blob(blobs, record)

    def extract() -> tuple[list[Part], PixelFrames | None]:
        dataset = read_dataset(data)
        if path.strip("/").upper() in PIXEL_DATA_TAGS:
            frames = pixel_frames(dataset, record.transfer_syntax_uid)
            if frames.encapsulated:
                return frame_parts(frames, frames.frames), frames
            return frame_parts(frames, [b"".join(frames.frames)]), frames
        bulk = element_value(dataset, path)
        return [Part(OCTET_STREAM, as_little_endian(bulk))], None

    return await asyncio.to_thread(extract)


def ensure_pixel_record(record: InstanceRecord) -> None:
    """404 early for an instance whose stored header says it has no pixel data."""
    if not any(tag in record.dataset for tag in PIXEL_DATA_TAGS):
        raise NotFoundError(f"instance {record.sop_instance_uid} has no pixel data")
