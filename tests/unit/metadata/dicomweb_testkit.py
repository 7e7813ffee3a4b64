"""Helpers of the metadata tests: test data as the store keeps it, and an independent multipart reader."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lucerna.core.auth import Authenticator
from lucerna.core.dicom.attributes import derive
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.events.ports import Envelope
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.ports import BlobStore, DicomJson, InstanceRecord, MetadataStore, PutOutcome
from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from lucerna.metadata.service import MetadataService
from tests.factories import ct_slice


def boundary_of(content_type: str) -> str:
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    assert found, f"no boundary in {content_type!r}"
    return found.group(1)


def read_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """(headers with lower-case names, payload) of each part, checking the framing strictly."""
    assert content_type.startswith("multipart/related"), content_type
    delimiter = b"--" + boundary_of(content_type).encode()
    assert body.startswith(delimiter + b"\r\n")
    assert body.endswith(delimiter + b"--\r\n")
    parts = []
    for raw in body.split(b"\r\n" + delimiter)[:-1]:
        piece = raw.removeprefix(delimiter)
        assert piece.startswith(b"\r\n")
        head, _, payload = piece[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            assert int(headers["content-length"]) == len(payload)
        parts.append((headers, payload))
    return parts


TEST_FILES = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


def bundled_file(name: str) -> bytes:
    """The bytes of one of pydicom's bundled test files (never get_testdata_files: it downloads)."""
    return Path(TEST_FILES, name).read_bytes()


def part10(ds: Dataset) -> bytes:
    """A data set written as a Part-10 file."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dataset_json(ds: Dataset) -> DicomJson:
    """The header as the InstanceRecord contract keeps it: binary values over 1 KiB and Pixel Data
    as ``{"vr": VR}`` alone."""
    converted = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _: "bulk")
    return _strip(converted)


def _strip(dataset: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for tag, element in dataset.items():
        if tag.startswith("0002"):
            continue
        if "BulkDataURI" in element or tag in {"7FE00010", "7FE00008", "7FE00009"}:
            out[tag] = {"vr": element["vr"]}
        elif element.get("vr") == "SQ" and element.get("Value"):
            out[tag] = {"vr": "SQ", "Value": [_strip(item) for item in element["Value"]]}
        else:
            out[tag] = element
    return out


async def store_instance(blobs: BlobStore, metadata: MetadataStore, data: bytes) -> InstanceRecord:
    """Store Part-10 bytes as ingestion does: blob first, then the metadata record."""
    ds = pydicom.dcmread(BytesIO(data), force=True)
    blob = await blobs.put(data)
    dataset = dataset_json(ds)
    record = InstanceRecord(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        sha256=blob.sha256,
        size=blob.size,
        source="stow:test",
        received_at=datetime.now(UTC),
        dataset=dataset,
        attributes=derive(dataset),
    )
    outcomes = await metadata.put_instances([record])
    assert outcomes == [PutOutcome.CREATED], outcomes
    return record


BASE_URL = "http://lucerna.test"


@dataclass
class Env:
    """A running metadata service, its resources, and the audit records it published."""

    resources: Resources
    client: httpx.AsyncClient
    audits: list[Envelope] = field(default_factory=list)
    records: dict[str, InstanceRecord] = field(default_factory=dict)  # by a short name
    bytes_of: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> stored bytes

    async def store(self, name: str, data: bytes) -> InstanceRecord:
        record = await store_instance(self.resources.blobs, self.resources.metadata, data)
        self.records[name] = record
        self.bytes_of[record.sop_instance_uid] = data
        return record

    async def wait_for_audits(self, count: int, seconds: float = 5.0) -> list[Envelope]:
        for _ in range(int(seconds / 0.02)):
            if len(self.audits) >= count:
                break
            await asyncio.sleep(0.02)
        return self.audits


async def running(resources: Resources) -> AsyncIterator[Env]:
    """The app started (lifespan included) with an HTTP client on it."""
    app = create_app(resources, [MetadataService()])
    async with app.router.lifespan_context(app):
        env = Env(resources, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL))

        async def collect(envelope: Envelope) -> None:
            env.audits.append(envelope)

        await resources.bus.consume("audit.records", collect)
        async with env.client:
            yield env


async def seed(env: Env) -> None:
    """Two synthetic studies and three of pydicom's bundled instances."""
    study_a, series_a1, series_a2 = generate_uid(), generate_uid(), generate_uid()
    for number in (1, 2, 3):
        await env.store(f"a1-{number}", part10(ct_slice(study_a, series_a1, number, size=16)))
    for number in (1, 2):
        ds = ct_slice(study_a, series_a2, number, size=16)
        ds.SeriesNumber = 2
        ds.SeriesDescription = "LUNG 1MM"
        await env.store(f"a2-{number}", part10(ds))
    ds = ct_slice(generate_uid(), generate_uid(), 1, patient="SMITH^JANE", size=16)
    ds.Modality = "MR"
    ds.StudyDate, ds.StudyTime = "20250301", "083000"
    ds.AccessionNumber = "ACC0002"
    ds.StudyDescription = "MR BRAIN"
    ds.PatientBirthDate = "19800101"
    ds.PatientAge = "045Y"
    ds.InstitutionName = "LUCERNA GENERAL"
    await env.store("b", part10(ds))
    for name in ("CT_small.dcm", "SC_rgb_rle_2frame.dcm", "JPEG-lossy.dcm"):
        await env.store(name, bundled_file(name))


def make_resources(tmp_path: Path, **settings: object) -> Resources:
    """Resources on the embedded adapters in a test's folder (not started)."""
    config = CoreSettings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    return Resources(
        settings=config,
        auth=Authenticator(config),
        bus=InProcessBus(),
        blobs=FilesystemBlobStore(tmp_path / "blobs"),
        metadata=SqliteMetadataStore(tmp_path / "metadata.sqlite"),
        search=SqliteSearchIndex(tmp_path / "search.sqlite"),
    )
