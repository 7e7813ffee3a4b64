"""The metadata service over the embedded adapters (SQLite, filesystem blobs, in-process bus),
driven through its HTTP app in process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.unit.metadata.dicomweb_testkit import Env, make_resources, running, seed


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """A seeded service shared by a module's read-only tests."""
    async for running_env in running(
        make_resources(tmp_path_factory.mktemp("metadata"), auth_required=False)
    ):
        await seed(running_env)
        yield running_env
