"""Orthanc (a real PACS with a DICOMweb client) as a peer: it searches Lucerna with QIDO-RS and pulls
a study with WADO-RS; what it stores must be byte for byte what Lucerna holds."""

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from lucerna.core.auth import Authenticator
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from lucerna.metadata.service import MetadataService
from tests.unit.metadata.dicomweb_testkit import Env, seed

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def lucerna(tmp_path: Path) -> AsyncIterator[tuple[str, Env]]:
    """The metadata service on a real HTTP port, seeded."""
    settings = CoreSettings(data_dir=tmp_path, auth_required=False)
    resources = Resources(
        settings=settings,
        auth=Authenticator(settings),
        bus=InProcessBus(),
        blobs=FilesystemBlobStore(tmp_path / "blobs"),
        metadata=SqliteMetadataStore(tmp_path / "metadata.sqlite"),
        search=SqliteSearchIndex(tmp_path / "search.sqlite"),
    )
    port = _free_port()
    config = uvicorn.Config(
        create_app(resources, [MetadataService()]),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as client:
        env = Env(resources, client)
        await seed(env)
        yield f"{base}/dicom-web", env
    server.should_exit = True
    await task


async def test_orthanc_searches_and_pulls_a_study_from_lucerna(
    orthanc: Any, lucerna: tuple[str, Env]
) -> None:
    dicomweb_url, env = lucerna
    study = env.records["a1-1"].study_uid
    async with httpx.AsyncClient(base_url=orthanc.http_url, timeout=60) as pacs:
        registered = await pacs.put("/dicom-web/servers/lucerna", json={"Url": dicomweb_url})
        assert registered.status_code == 200, registered.text

        found = await pacs.post(
            "/dicom-web/servers/lucerna/get", json={"Uri": "/studies", "Arguments": {"PatientName": "doe*"}}
        )
        assert found.status_code == 200, found.text
        assert [s["0020000D"]["Value"][0] for s in found.json()] == [study]

        pulled = await pacs.post(
            "/dicom-web/servers/lucerna/retrieve", json={"Resources": [{"Study": study}]}
        )
        assert pulled.status_code == 200, pulled.text

        for name in ("a1-1", "a1-2", "a1-3", "a2-1", "a2-2"):
            record = env.records[name]
            lookup = await pacs.post("/tools/lookup", content=record.sop_instance_uid)
            [match] = [m for m in lookup.json() if m["Type"] == "Instance"]
            stored = await pacs.get(f"/instances/{match['ID']}/file")
            assert stored.content == env.bytes_of[record.sop_instance_uid], name
