"""Ingestion over the embedded adapters: SQLite metadata, filesystem blobs, the in-process bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lucerna.core.bootstrap import build_resources
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2
from lucerna.ingestion.ingest import Ports
from tests.factories import ct_slice

InstanceFactory = Callable[..., bytes]


def encode(ds: Dataset) -> bytes:
    """A data set as Part-10 bytes."""
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def ct() -> InstanceFactory:
    """Part-10 bytes of a small CT slice; ``study``/``series`` UIDs and attribute changes as keywords."""

    def make(study: str | None = None, series: str | None = None, number: int = 1, **changes: Any) -> bytes:
        ds = ct_slice(study or generate_uid(), series or generate_uid(), number, size=16)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return encode(ds)

    return make


class EventLog:
    """Every event the bus routes to the audit and orchestrator queues, as delivered."""

    def __init__(self) -> None:
        self.audit: list[Envelope] = []
        self.ready: list[Envelope] = []

    async def handle_audit(self, envelope: Envelope) -> None:
        self.audit.append(envelope)

    async def handle_ready(self, envelope: Envelope) -> None:
        self.ready.append(envelope)

    def audit_records(self) -> list[events_pb2.AuditRecord]:
        return [codec.decode(e, events_pb2.AuditRecord) for e in self.audit]

    def studies_ready(self) -> list[events_pb2.StudyReady]:
        return [codec.decode(e, events_pb2.StudyReady) for e in self.ready]

    async def settle(self) -> None:
        """Let the bus deliver what was published."""
        for _ in range(5):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)


@pytest.fixture
async def resources(tmp_path: Path) -> AsyncIterator[Resources]:
    """The embedded adapters, started; auth off (local mode on loopback)."""
    built = build_resources(CoreSettings(data_dir=tmp_path))
    await built.metadata.start()
    await built.bus.start()
    yield built
    await built.bus.close()
    await built.metadata.close()


@pytest.fixture
async def events(resources: Resources) -> EventLog:
    """What ingestion publishes, collected from the topology's queues."""
    log = EventLog()
    await resources.bus.consume("audit.records", log.handle_audit)
    await resources.bus.consume("orchestrator.study-ready", log.handle_ready)
    return log


@pytest.fixture
def ports(resources: Resources) -> Ports:
    return Ports(blobs=resources.blobs, metadata=resources.metadata, audit=resources.audit_trail)


@pytest.fixture
def stored_blobs(resources: Resources) -> Callable[[], list[Path]]:
    """Every blob file on disk (temporary files included, which should never linger)."""

    def files() -> list[Path]:
        root = resources.settings.blobs_path
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    return files


@pytest.fixture
def part10() -> Callable[[Dataset], bytes]:
    """Encodes a data set as Part-10 bytes."""
    return encode
