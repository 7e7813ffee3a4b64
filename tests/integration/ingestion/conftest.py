"""Ingestion running for real: the HTTP app on uvicorn (with its lifespan) and the DIMSE listener on
free ports, over the embedded adapters, in the test's event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from pydicom.uid import generate_uid

from lucerna.core.bootstrap import build_resources
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2
from lucerna.ingestion.service import IngestionService
from lucerna.ingestion.settings import IngestionSettings
from tests.factories import ct_slice

AE_TITLE = "LUCERNA_IT"
ALLOWED_CALLING = ["MODALITY1", "STORESCU", "ECHOSCU", "TESTSCU"]


@dataclass
class RunningIngestion:
    """Where the running service answers, and its adapters for checking what it stored."""

    resources: Resources
    service: IngestionService
    http_url: str
    ready: list[events_pb2.StudyReady] = field(default_factory=list)

    async def wait_ready(self, study_uid: str) -> list[events_pb2.StudyReady]:
        """The study.ready events of a study, once at least one has come (within 10 s)."""
        for _ in range(200):
            found = [e for e in self.ready if e.study_instance_uid == study_uid]
            if found:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"no study.ready for {study_uid} within 10 s")

    @property
    def dimse_port(self) -> int:
        assert self.service.dimse is not None
        return self.service.dimse.address[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def ingestion(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningIngestion]:
    """The service as ``lucerna serve ingestion`` runs it, with test AE titles and a short quiet period."""
    resources = build_resources(CoreSettings(data_dir=tmp_path_factory.mktemp("ingestion")))
    service = IngestionService(
        IngestionSettings(
            ae_title=AE_TITLE,
            dimse_port=0,
            allowed_calling_ae_titles=ALLOWED_CALLING,
            quiet_period_seconds=0.2,
            assembly_interval_seconds=0.05,
        )
    )
    port = _free_port()
    config = uvicorn.Config(
        create_app(resources, [service]), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    running = RunningIngestion(resources, service, f"http://127.0.0.1:{port}")

    async def collect(envelope: Envelope) -> None:
        running.ready.append(codec.decode(envelope, events_pb2.StudyReady))

    await resources.bus.consume("orchestrator.study-ready", collect)
    yield running
    server.should_exit = True
    await serving


@pytest.fixture
def ct_folder(tmp_path: Path) -> Callable[..., tuple[str, list[Path]]]:
    """Writes a small CT study as files; returns its Study Instance UID and the files."""

    def write(slices: int = 3) -> tuple[str, list[Path]]:
        study, series = generate_uid(), generate_uid()
        folder = tmp_path / study
        folder.mkdir()
        files = []
        for number in range(1, slices + 1):
            path = folder / f"{number:04d}.dcm"
            ct_slice(study, series, number, size=32).save_as(path, enforce_file_format=True)
            files.append(path)
        return study, files

    return write
