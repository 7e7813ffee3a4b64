"""The job API over HTTP: scopes, listing, one job, operator retry/cancel, manual requests, dead letters."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from pydantic import SecretStr

from lucerna.orchestrator.jobs import JobState
from tests.unit.orchestrator.kit import (
    Orchestra,
    chest_instances,
    embedded_resources,
    failed,
    head_instances,
    orchestrator_settings,
    running,
    study_ready,
)

SECRET = "orchestrator-test-secret-0123456789abcdef"


def token(scope: str) -> dict[str, str]:
    claims = {"sub": "ops@hospital.example", "scope": scope, "exp": int(time.time()) + 3600}
    return {"authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


READ = token("system/Job.read")
WRITE = token("system/Job.read system/Job.write")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Orchestra]:
    resources = embedded_resources(tmp_path, auth_required=True, jwt_secret=SecretStr(SECRET))
    async with running(resources, orchestrator_settings(tmp_path)) as orchestra:
        yield orchestra


async def two_jobs(api: Orchestra, study: str = "1.1") -> dict[str, str]:
    """A study with a chest and a head series; the job ids by model."""
    await api.publish(study_ready(study, [*chest_instances(study), *head_instances(study)]))
    await api.until(lambda: sum(r.study_instance_uid == study for r in api.requested()) == 2)
    return {r.model: r.job_id for r in api.requested() if r.study_instance_uid == study}


async def test_every_route_wants_a_token_with_the_job_scope(api: Orchestra) -> None:
    routes = [
        ("GET", "/api/jobs", READ),
        ("GET", "/api/jobs/dead-letters", READ),
        ("GET", "/api/jobs/" + "0" * 32, READ),
        ("POST", "/api/jobs", WRITE),
        ("POST", "/api/jobs/" + "0" * 32 + "/retry", WRITE),
        ("POST", "/api/jobs/" + "0" * 32 + "/cancel", WRITE),
    ]
    for method, path, _ in routes:
        response = await api.client.request(method, path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        wrong = await api.client.request(method, path, headers=token("system/ImagingStudy.read"))
        assert wrong.status_code == 403, path
    for method, path, scope in routes:
        if scope is WRITE:
            read_only = await api.client.request(method, path, headers=READ)
            assert read_only.status_code == 403
            assert read_only.json() == {"error": "scope system/Job.write is required"}


async def test_list_and_filter_jobs(api: Orchestra) -> None:
    first = await two_jobs(api, "1.1")
    second = await two_jobs(api, "2.2")
    response = await api.client.get("/api/jobs", headers=READ)
    assert response.status_code == 200
    body = response.json()
    assert (body["limit"], body["offset"]) == (100, 0)
    assert {job["job_id"] for job in body["jobs"]} == {*first.values(), *second.values()}
    assert "history" not in body["jobs"][0]
    by_study = await api.client.get("/api/jobs", params={"study": "2.2"}, headers=READ)
    assert {job["job_id"] for job in by_study.json()["jobs"]} == set(second.values())
    stat = await api.client.get(
        "/api/jobs", params={"model": "head-ct-hemorrhage", "state": "queued"}, headers=READ
    )
    assert {job["job_id"] for job in stat.json()["jobs"]} == {
        first["head-ct-hemorrhage"],
        second["head-ct-hemorrhage"],
    }
    page = await api.client.get("/api/jobs", params={"limit": 1, "offset": 1}, headers=READ)
    assert len(page.json()["jobs"]) == 1


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"state": "done"}, "state 'done' is not one of queued, running, succeeded, failed, dead, cancelled"),
        ({"limit": "many"}, "limit must be an integer, not 'many'"),
        ({"limit": "0"}, "limit must be between 1 and 1000"),
        ({"offset": "-1"}, "offset must be at least 0"),
        ({"patient": "x"}, "unknown parameter(s) patient; known: limit, model, offset, state, study"),
    ],
)
async def test_bad_list_parameters_are_refused(api: Orchestra, params: dict[str, str], error: str) -> None:
    response = await api.client.get("/api/jobs", params=params, headers=READ)
    assert (response.status_code, response.json()) == (400, {"error": error})


async def test_one_job_with_its_history(api: Orchestra) -> None:
    job_id = (await two_jobs(api))["lung-nodule-detector"]
    response = await api.client.get(f"/api/jobs/{job_id}", headers=READ)
    assert response.status_code == 200
    job = response.json()
    assert (job["job_id"], job["state"], job["attempt"], job["priority"]) == (job_id, "queued", 1, "routine")
    assert (job["model"], job["model_version"], job["instance_count"]) == ("lung-nodule-detector", "1", 3)
    assert job["request_published"] is True
    assert job["created_at"].endswith("+00:00")
    assert job["durations"] == {"wait_seconds": None, "run_seconds": None, "total_seconds": None}
    [created] = job["history"]
    assert (created["from"], created["to"], created["reason"]) == (
        None,
        "queued",
        "rule chest-ct-lung-nodules matched burst 1",
    )
    missing = await api.client.get("/api/jobs/" + "0" * 32, headers=READ)
    assert (missing.status_code, missing.json()) == (404, {"error": f"no job {'0' * 32}"})


async def test_cancel_and_retry_follow_the_state_machine(api: Orchestra) -> None:
    job_id = (await two_jobs(api))["lung-nodule-detector"]
    retry_queued = await api.client.post(f"/api/jobs/{job_id}/retry", headers=WRITE)
    assert (retry_queued.status_code, retry_queued.json()) == (
        409,
        {"error": f"job {job_id} is queued; it cannot become queued"},
    )
    cancelled = await api.client.post(f"/api/jobs/{job_id}/cancel", headers=WRITE)
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["history"][-1]["reason"] == "cancelled by ops@hospital.example"
    again = await api.client.post(f"/api/jobs/{job_id}/cancel", headers=WRITE)
    assert again.status_code == 409
    retried = await api.client.post(f"/api/jobs/{job_id}/retry", headers=WRITE)
    assert retried.status_code == 200
    assert (retried.json()["state"], retried.json()["attempt"]) == ("queued", 2)
    await api.until(lambda: any(r.job_id == job_id and r.attempt == 2 for r in api.requested()))
    assert (await api.job(job_id)).publish_pending is False


async def test_a_failed_job_can_be_retried(api: Orchestra) -> None:
    job_id = (await two_jobs(api))["head-ct-hemorrhage"]
    await api.publish(failed(job_id))
    await api.job_in(job_id, JobState.FAILED)
    response = await api.client.post(f"/api/jobs/{job_id}/retry", headers=WRITE)
    assert response.status_code == 200
    assert response.json()["last_error"] == "pixel data cannot be decoded"
    missing = await api.client.post("/api/jobs/" + "0" * 32 + "/retry", headers=WRITE)
    assert missing.status_code == 404


async def test_models_requested_by_hand_run_on_the_study_last_seen(api: Orchestra) -> None:
    study = "3.3"
    await api.publish(study_ready(study, chest_instances(study, 2), burst=1))
    await api.publish(study_ready(study, chest_instances(study, 4), burst=2))
    await api.until(lambda: len(api.requests) == 2)
    body = {"study_instance_uid": study, "models": ["lung-nodule-detector-int8"], "priority": "stat"}
    created = await api.client.post("/api/jobs", json=body, headers=WRITE)
    assert created.status_code == 201
    [job] = created.json()["jobs"]
    assert (job["model"], job["priority"], job["instance_count"]) == ("lung-nodule-detector-int8", "stat", 4)
    assert job["history"][0]["reason"] == "requested by ops@hospital.example"
    await api.until(lambda: any(r.job_id == job["job_id"] for r in api.requested()))
    request = next(e for e in api.requests if e.correlation_id == job["job_id"])
    assert request.routing_key == "inference.requested.stat.lung-nodule-detector-int8"
    again = await api.client.post("/api/jobs", json=body, headers=WRITE)
    assert again.status_code == 200
    assert [j["job_id"] for j in again.json()["jobs"]] == [job["job_id"]]


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{", 400, "the body is not valid JSON"),
        (b"[]", 400, "the body must be a JSON object"),
        (b'{"models": ["lung-nodule-detector"]}', 400, "study_instance_uid must be a non-empty string"),
        (
            b'{"study_instance_uid": "3.3", "models": []}',
            400,
            "models must be a non-empty list of model names",
        ),
        (b'{"study_instance_uid": "3.3", "models": ["x"], "extra": 1}', 400, "unknown parameter(s) extra"),
        (b'{"study_instance_uid": "3.3", "models": ["x"], "priority": 1}', 400, "priority must be a string"),
        (
            b'{"study_instance_uid": "3.3", "models": ["lung-nodule-detector"], "priority": "asap"}',
            422,
            "priority 'asap' is not one of stat, routine",
        ),
        (
            b'{"study_instance_uid": "3.3", "models": ["spleen-seg", "lung-nodule-detector"]}',
            422,
            "unknown model(s) spleen-seg; the model repository has: head-ct-hemorrhage, lung-nodule-detector,"
            " lung-nodule-detector-int8",
        ),
        (
            b'{"study_instance_uid": "9.9.9", "models": ["lung-nodule-detector"]}',
            404,
            "study 9.9.9 is unknown here: no study.ready for it has been received",
        ),
    ],
)
async def test_bad_manual_requests_are_refused(api: Orchestra, body: bytes, status: int, error: str) -> None:
    headers = {**WRITE, "content-type": "application/json"}
    response = await api.client.post("/api/jobs", content=body, headers=headers)
    assert response.status_code == status
    assert response.json()["error"].startswith(error)


async def test_a_manual_request_must_be_json_and_small(api: Orchestra) -> None:
    form = await api.client.post("/api/jobs", data={"study_instance_uid": "1"}, headers=WRITE)
    assert (form.status_code, form.json()) == (400, {"error": "the body must be application/json"})
    huge = b'{"study_instance_uid": "' + b"1" * 70_000 + b'", "models": ["x"]}'
    response = await api.client.post(
        "/api/jobs", content=huge, headers={**WRITE, "content-type": "application/json"}
    )
    assert response.status_code == 413


async def test_dead_letters_are_listed_newest_first(api: Orchestra) -> None:
    empty = await api.client.get("/api/jobs/dead-letters", headers=READ)
    assert empty.json() == {"dead_letters": [], "limit": 100, "offset": 0}
    for study in ("4.4", "5.5"):
        chest = chest_instances(study)
        await api.publish(study_ready(study, chest))
        await api.until(lambda study=study: any(r.study_instance_uid == study for r in api.requested()))
        job_id = next(r.job_id for r in api.requested() if r.study_instance_uid == study)
        api.poison.add(job_id)
        await api.client.post(f"/api/jobs/{job_id}/cancel", headers=WRITE)
        await api.client.post(f"/api/jobs/{job_id}/retry", headers=WRITE)
        await api.job_in(job_id, JobState.DEAD)
    response = await api.client.get("/api/jobs/dead-letters", headers=READ)
    letters = response.json()["dead_letters"]
    assert [letter["job_id"] for letter in letters] == [
        next(r.job_id for r in api.requested() if r.study_instance_uid == s) for s in ("5.5", "4.4")
    ]
    assert letters[0]["queue"] == "inference.routine" and letters[0]["attempt"] == 2
    assert letters[0]["reason"].startswith("permanent: cannot decode the pixels")
    dead = await api.client.get(f"/api/jobs/{letters[0]['job_id']}", headers=READ)
    assert dead.json()["state"] == "dead"
    assert dead.json()["dead_reason"].startswith("request dead-lettered: permanent:")
