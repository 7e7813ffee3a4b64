"""Study search, the indexer loop, reindex, and auth on the metadata routes."""

import asyncio
import time
from pathlib import Path

import jwt
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from pydicom.uid import generate_uid

from lucerna.core.storage.ports import DicomJson
from lucerna.metadata import indexing
from lucerna.metadata.indexing import Indexer, reindex
from tests.factories import ct_slice
from tests.unit.metadata.dicomweb_testkit import Env, make_resources, part10, running, seed, store_instance

pytestmark = pytest.mark.unit

SECRET = "metadata-tests-secret-0123456789abcdef"


@pytest.fixture
async def fresh(tmp_path: Path):  # type: ignore[no-untyped-def]
    async for env in running(make_resources(tmp_path, auth_required=False)):
        await seed(env)
        yield env


async def _wait_until_indexed(env: Env) -> None:
    deadline = time.monotonic() + 5.0
    while await env.resources.metadata.studies_to_index():
        assert time.monotonic() < deadline, "the indexer loop did not catch up"
        await asyncio.sleep(0.05)


async def test_indexer_loop_makes_new_studies_searchable(fresh: Env) -> None:
    await _wait_until_indexed(fresh)
    response = await fresh.client.get(
        "/dicom-web/studies", params={"PatientName": "smiht^jane", "fuzzymatching": "true"}
    )
    assert [s["0020000D"]["Value"][0] for s in response.json()] == [fresh.records["b"].study_uid]
    assert REGISTRY.get_sample_value("lucerna_search_index_lag_seconds") == 0.0


async def test_free_text_search_returns_studies_in_rank_order(fresh: Env) -> None:
    await _wait_until_indexed(fresh)
    response = await fresh.client.get("/api/studies/search", params={"q": "smith brain"})
    assert response.status_code == 200
    [study] = response.json()
    assert study["0020000D"]["Value"] == [fresh.records["b"].study_uid]
    assert study["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{fresh.records['b'].study_uid}")
    assert study["00201208"]["Value"] == [1]
    assert (await fresh.client.get("/api/studies/search", params={"q": "nothing-like-this"})).json() == []
    for params, message in [
        ({}, "q (the text to search for) is required"),
        ({"q": "x", "limit": "0"}, "limit: 0 is not between 1 and 200"),
        ({"q": "x", "sort": "date"}, "unknown query parameter 'sort'"),
    ]:
        bad = await fresh.client.get("/api/studies/search", params=params)
        assert bad.status_code == 400 and message in bad.json()["error"]


async def test_reindex_rebuilds_the_index_from_the_store(tmp_path: Path) -> None:
    resources = make_resources(tmp_path, auth_required=False)
    async for env in running(resources):
        await seed(env)
        await _wait_until_indexed(env)
    # As `lucerna reindex` does: fresh adapters, not started.
    count = await reindex(make_resources(tmp_path, auth_required=False))
    assert count == 5  # two synthetic studies, three bundled files
    check = make_resources(tmp_path, auth_required=False)
    await check.search.start()
    try:
        assert await check.search.search("SMITH") != []
    finally:
        await check.search.close()


class _FlakySearch:
    """A search index that fails its first writes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.indexed: list[DicomJson] = []

    async def index_studies(self, studies: list[DicomJson]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("index unavailable")
        self.indexed += studies


async def test_indexer_survives_failures_and_retries(tmp_path: Path) -> None:
    resources = make_resources(tmp_path)
    await resources.metadata.start()
    try:
        record = await store_instance(
            resources.blobs, resources.metadata, part10(ct_slice(generate_uid(), generate_uid(), 1, size=8))
        )
        flaky = _FlakySearch(failures=2)
        loop = Indexer(resources.metadata, flaky, interval=0.01)  # type: ignore[arg-type]
        failures_before = REGISTRY.get_sample_value("lucerna_search_index_failures_total") or 0.0
        loop.start()
        try:
            deadline = time.monotonic() + 5
            while await resources.metadata.studies_to_index():
                assert time.monotonic() < deadline, "the loop did not recover"
                await asyncio.sleep(0.01)
        finally:
            await loop.stop()
        assert [s["0020000D"]["Value"][0] for s in flaky.indexed] == [record.study_uid]
        assert (
            REGISTRY.get_sample_value("lucerna_search_index_failures_total") or 0.0
        ) - failures_before == 2
    finally:
        await resources.metadata.close()


def _token(scope: str) -> str:
    claims = {"sub": "viewer-7", "scope": scope, "exp": int(time.time()) + 60}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_routes_require_a_token_with_imaging_study_read(tmp_path: Path) -> None:
    resources = make_resources(tmp_path, auth_required=True, jwt_secret=SecretStr(SECRET))
    async for env in running(resources):
        await seed(env)
        record = env.records["b"]
        paths = [
            "/dicom-web/studies",
            f"/dicom-web/studies/{record.study_uid}",
            f"/dicom-web/studies/{record.study_uid}/metadata",
            "/api/studies/search?q=smith",
        ]
        for path in paths:
            anonymous = await env.client.get(path)
            assert anonymous.status_code == 401, path
            assert anonymous.headers["www-authenticate"].startswith("Bearer")
            wrong = await env.client.get(
                path, headers={"Authorization": f"Bearer {_token('system/Observation.read')}"}
            )
            assert wrong.status_code == 403, path
            assert "system/ImagingStudy.read" in wrong.json()["error"]
        allowed = await env.client.get(
            paths[2], headers={"Authorization": f"Bearer {_token('system/ImagingStudy.read')}"}
        )
        assert allowed.status_code == 200
        audits = await env.wait_for_audits(1)
        assert len(audits) == 1  # refused requests read nothing


def test_reindex_is_what_the_cli_imports() -> None:
    assert indexing.reindex is reindex
