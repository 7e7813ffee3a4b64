"""QIDO-RS, WADO-RS, search and reindex on MongoDB (FerretDB) and Elasticsearch."""

from pathlib import Path

import pytest

from lucerna.core.storage.elastic import ElasticSearchIndex
from lucerna.metadata.indexing import index_changes, reindex
from tests.integration.metadata.server_kit import server_resources
from tests.unit.metadata.dicomweb_testkit import BASE_URL, Env, read_parts

pytestmark = pytest.mark.integration


def _uids(results: list[dict], tag: str = "0020000D") -> list[str]:  # type: ignore[type-arg]
    return [r[tag]["Value"][0] for r in results]


async def _qido(env: Env, path: str, **params: object) -> list[dict]:  # type: ignore[type-arg]
    response = await env.client.get(f"/dicom-web{path}", params=params)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_qido_matching_on_mongodb(server_env: Env) -> None:
    env = server_env
    a, b = env.records["a1-1"].study_uid, env.records["b"].study_uid
    # Study attribute searches are answered by the search index, as of its last indexing (ADR 0004).
    await index_changes(env.resources.metadata, env.resources.search)
    assert _uids(await _qido(env, "/studies", PatientName="smi*")) == [b]
    assert _uids(await _qido(env, "/studies", StudyDate="20250101-20251231")) == [b]
    assert sorted(_uids(await _qido(env, "/studies", StudyInstanceUID=f"{a},{b}"))) == sorted([a, b])
    assert b in _uids(await _qido(env, "/studies", ModalitiesInStudy="MR,OT"))
    [study] = await _qido(env, "/studies", StudyInstanceUID=b, includefield="PatientAge")
    assert study["00101010"]["Value"] == ["045Y"]
    assert study["00081190"]["Value"] == [f"{BASE_URL}/dicom-web/studies/{b}"]
    series = await _qido(env, "/series", PatientID="PID-DOE", SeriesDescription="LUNG*")
    assert _uids(series, "0020000E") == [env.records["a2-1"].series_uid]
    paged = [
        *await _qido(env, f"/studies/{a}/instances", limit=3),
        *await _qido(env, f"/studies/{a}/instances", limit=3, offset=3),
    ]
    everything = [env.records[n].sop_instance_uid for n in ("a1-1", "a1-2", "a1-3", "a2-1", "a2-2")]
    assert sorted(_uids(paged, "00080018")) == sorted(everything)


async def test_wado_on_mongodb_returns_the_stored_bytes(server_env: Env) -> None:
    env = server_env
    study = env.records["a1-1"].study_uid
    response = await env.client.get(f"/dicom-web/studies/{study}")
    parts = read_parts(response.headers["content-type"], response.content)
    names = ("a1-1", "a1-2", "a1-3", "a2-1", "a2-2")
    assert [payload for _, payload in parts] == [env.bytes_of[env.records[n].sop_instance_uid] for n in names]
    rle = env.records["SC_rgb_rle_2frame.dcm"]
    instance = f"/dicom-web/studies/{rle.study_uid}/series/{rle.series_uid}/instances/{rle.sop_instance_uid}"
    [metadata] = (await env.client.get(f"{instance}/metadata")).json()
    assert metadata["7FE00010"]["BulkDataURI"] == f"{BASE_URL}{instance}/bulkdata/7FE00010"
    frames = await env.client.get(f"{instance}/frames/1,2")
    assert len(read_parts(frames.headers["content-type"], frames.content)) == 2


async def test_indexing_and_search_on_elasticsearch(server_env: Env) -> None:
    env = server_env
    await index_changes(env.resources.metadata, env.resources.search)
    assert isinstance(env.resources.search, ElasticSearchIndex)
    await env.resources.search.refresh()
    fuzzy = await _qido(env, "/studies", PatientName="SMYTH^JANE", fuzzymatching="true")
    assert _uids(fuzzy) == [env.records["b"].study_uid]
    found = (await env.client.get("/api/studies/search", params={"q": "brain"})).json()
    assert _uids(found) == [env.records["b"].study_uid]


async def test_reindex_on_the_servers(
    server_env: Env, tmp_path: Path, mongodb_url: str, elasticsearch_url: str, names: tuple[str, str]
) -> None:
    assert await reindex(server_resources(tmp_path, mongodb_url, names[0], elasticsearch_url, names[1])) == 5
