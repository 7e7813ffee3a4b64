"""The metadata service over the embedded adapters (SQLite, filesystem blobs, in-process bus),
driven through its HTTP app in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lucerna.core.auth import Authenticator
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from tests.unit.metadata.dicomweb_testkit import Env, running, seed


def make_resources(tmp_path: Path, **settings: object) -> Resources:
    config = CoreSettings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    return Resources(
        settings=config,
        auth=Authenticator(config),
        bus=InProcessBus(),
        blobs=FilesystemBlobStore(tmp_path / "blobs"),
        metadata=SqliteMetadataStore(tmp_path / "metadata.sqlite"),
        search=SqliteSearchIndex(tmp_path / "search.sqlite"),
    )


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """A seeded service shared by a module's read-only tests."""
    async for running_env in running(
        make_resources(tmp_path_factory.mktemp("metadata"), auth_required=False)
    ):
        await seed(running_env)
        yield running_env
