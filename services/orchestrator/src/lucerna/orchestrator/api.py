"""The job API: plain JSON under ``/api/jobs``, guarded by the ``Job`` scopes.

- ``GET /api/jobs?study=&state=&model=&limit=&offset=``: jobs, newest first (``system/Job.read``).
- ``GET /api/jobs/{id}``: one job with its history (``system/Job.read``).
- ``POST /api/jobs``: ``{"study_instance_uid", "models", "priority"}`` runs models on a study's last
  known instance set; 201 when a job was created, 200 when all existed (``system/Job.write``).
- ``POST /api/jobs/{id}/retry``: failed, dead or cancelled → queued, next attempt (``system/Job.write``).
- ``POST /api/jobs/{id}/cancel``: queued or running → cancelled (``system/Job.write``).
- ``GET /api/jobs/dead-letters?limit=&offset=``: dead-lettered inference requests (``system/Job.read``).

Errors are ``{"error": "..."}`` with 400 (malformed request), 401/403 (token, scope), 404 (unknown
job or study), 409 (a transition the job's state does not allow), 413 (body too large), 422 (unknown
model or priority) or 503 (still starting). Times are ISO 8601 in UTC.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from lucerna.core.auth import Principal
from lucerna.core.service import Resources
from lucerna.orchestrator.errors import InvalidRequestError, OrchestratorError, UnprocessableError
from lucerna.orchestrator.jobs import Job, JobState, Priority
from lucerna.orchestrator.records import dead_letter_record, iso, transition_record
from lucerna.orchestrator.workflow import Workflow

JOBS_PATH = "/api/jobs"
RESOURCE = "Job"
MAX_LIMIT = 1000
MAX_BODY_BYTES = 64 * 1024

Endpoint = Callable[[Request, Workflow, Principal], Awaitable[Response]]


def job_routes(resources: Resources, workflow: Callable[[], Workflow | None]) -> Sequence[BaseRoute]:
    """The job API's routes; ``workflow`` gives the running workflow (None until started)."""

    def guarded(path: str, endpoint: Endpoint, access: str, methods: list[str], name: str) -> Route:
        async def handle(request: Request) -> Response:
            principal = resources.auth.require(request, RESOURCE, access)
            running = workflow()
            if running is None:
                raise HTTPException(503, "the orchestrator is starting; try again shortly")
            try:
                return await endpoint(request, running, principal)
            except OrchestratorError as error:
                raise HTTPException(error.status, error.message) from error

        return Route(path, handle, methods=methods, name=name)

    return [
        guarded(JOBS_PATH, _list, "read", ["GET"], "jobs-list"),
        guarded(JOBS_PATH, _create, "write", ["POST"], "jobs-create"),
        # Before /{job_id}, which would take "dead-letters" for an id.
        guarded(f"{JOBS_PATH}/dead-letters", _dead_letters, "read", ["GET"], "jobs-dead-letters"),
        guarded(f"{JOBS_PATH}/{{job_id}}", _one, "read", ["GET"], "jobs-one"),
        guarded(f"{JOBS_PATH}/{{job_id}}/retry", _retry, "write", ["POST"], "jobs-retry"),
        guarded(f"{JOBS_PATH}/{{job_id}}/cancel", _cancel, "write", ["POST"], "jobs-cancel"),
    ]


async def _list(request: Request, workflow: Workflow, _: Principal) -> Response:
    params = request.query_params
    _only_known(params.keys(), {"study", "state", "model", "limit", "offset"})
    state = params.get("state")
    if state is not None and state not in {s.value for s in JobState}:
        raise InvalidRequestError(f"state {state!r} is not one of {', '.join(s.value for s in JobState)}")
    limit, offset = _paging(request)
    jobs = await workflow.store.list_jobs(
        study_uid=params.get("study") or None,
        state=JobState(state) if state else None,
        model=params.get("model") or None,
        limit=limit,
        offset=offset,
    )
    return JSONResponse({"jobs": [job_view(job) for job in jobs], "limit": limit, "offset": offset})


async def _one(request: Request, workflow: Workflow, _: Principal) -> Response:
    job = await workflow.get(request.path_params["job_id"])
    return JSONResponse(job_view(job, history=True))


async def _create(request: Request, workflow: Workflow, principal: Principal) -> Response:
    body = await _json_object(request)
    _only_known(body.keys(), {"study_instance_uid", "models", "priority"})
    study = body.get("study_instance_uid")
    if not isinstance(study, str) or not study.strip():
        raise InvalidRequestError("study_instance_uid must be a non-empty string")
    models = body.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise InvalidRequestError("models must be a non-empty list of model names")
    priority = body.get("priority", Priority.ROUTINE.value)
    if not isinstance(priority, str):
        raise InvalidRequestError("priority must be a string")
    if priority not in {p.value for p in Priority}:
        allowed = ", ".join(p.value for p in Priority)
        raise UnprocessableError(f"priority {priority!r} is not one of {allowed}")
    results = await workflow.request(study.strip(), models, Priority(priority), principal.subject)
    status = 201 if any(created for _, created in results) else 200
    return JSONResponse({"jobs": [job_view(job, history=True) for job, _ in results]}, status)


async def _retry(request: Request, workflow: Workflow, principal: Principal) -> Response:
    job = await workflow.retry(request.path_params["job_id"], principal.subject)
    return JSONResponse(job_view(job, history=True))


async def _cancel(request: Request, workflow: Workflow, principal: Principal) -> Response:
    job = await workflow.cancel(request.path_params["job_id"], principal.subject)
    return JSONResponse(job_view(job, history=True))


async def _dead_letters(request: Request, workflow: Workflow, _: Principal) -> Response:
    _only_known(request.query_params.keys(), {"limit", "offset"})
    limit, offset = _paging(request)
    records = await workflow.store.list_dead_letters(limit, offset)
    return JSONResponse(
        {"dead_letters": [dead_letter_record(r) for r in records], "limit": limit, "offset": offset}
    )


def job_view(job: Job, *, history: bool = False) -> dict[str, Any]:
    """A job as the API shows it."""
    view: dict[str, Any] = {
        "job_id": job.job_id,
        "study_instance_uid": job.study_uid,
        "model": job.model,
        "model_version": job.model_version,
        "priority": job.priority.value,
        "state": job.state.value,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "timeout_seconds": job.timeout_seconds,
        "instance_set_sha256": job.instance_set_sha256,
        "instance_count": job.instance_count,
        "created_at": iso(job.created_at),
        "queued_at": iso(job.queued_at),
        "requested_at": iso(job.requested_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "deadline": iso(job.deadline),
        "request_published": not job.publish_pending,
        "durations": {
            "wait_seconds": job.wait_seconds,
            "run_seconds": job.run_seconds,
            "total_seconds": job.total_seconds,
        },
        "worker": job.worker,
        "result_id": job.result_id,
        "weights_sha256": job.weights_sha256,
        "last_error": job.last_error,
        "dead_reason": job.dead_reason,
    }
    if history:
        view["history"] = [transition_record(entry) for entry in job.history]
    return view


def _paging(request: Request) -> tuple[int, int]:
    return (
        _integer(request, "limit", 100, 1, MAX_LIMIT),
        _integer(request, "offset", 0, 0, None),
    )


def _integer(request: Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(f"{name} must be an integer, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequestError(f"{name} must be {bounds}")
    return value


def _only_known(names: Any, known: set[str]) -> None:
    unknown = sorted(set(names) - known)
    if unknown:
        listed = ", ".join(sorted(known))
        raise InvalidRequestError(f"unknown parameter(s) {', '.join(unknown)}; known: {listed}")


async def _json_object(request: Request) -> dict[str, Any]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise InvalidRequestError("the body must be application/json")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return value
