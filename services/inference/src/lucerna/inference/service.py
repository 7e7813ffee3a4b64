"""The inference deployable: the worker on ``inference.stat`` and ``inference.routine``, the local Triton
server (unless Triton runs elsewhere), the result outbox relay, and ``/api/models`` and ``/api/results``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from lucerna.core.model_manifest import Manifest, load_repository
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.inference import local_triton
from lucerna.inference.results import MongoResultStore, ResultStore, SqliteResultStore
from lucerna.inference.settings import InferenceSettings
from lucerna.inference.triton import ModelMismatchError, TritonClient, TritonUnavailable
from lucerna.inference.worker import InferenceWorker, Ports

log = logging.getLogger(__name__)

# Set by ``companion_command`` in the runner's process, inherited by its worker processes: the runner
# starts the local Triton once per host, so the workers wait for it instead of starting their own.
COMPANION_MARK = "LUCERNA_INFERENCE_TRITON_COMPANION"
STAT_QUEUE = "inference.stat"
ROUTINE_QUEUE = "inference.routine"
_PROBE_SECONDS = 0.25
_MONITOR_SECONDS = 5.0
_CHILD_STOP_SECONDS = 30.0


class StartupError(RuntimeError):
    """The service cannot start: Triton serves a model unlike its manifest, or the local server failed."""


class InferenceService:
    """Runs models over studies: InferenceRequested in, stored results and InferenceCompleted out."""

    name = "inference"

    def __init__(self, settings: InferenceSettings | None = None) -> None:
        self._settings = settings
        self._manifests: dict[str, Manifest] = {}
        self._client: TritonClient | None = None
        self._results: ResultStore | None = None
        self._worker: InferenceWorker | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._checked = False
        self._log_path: Path | None = None

    @property
    def settings(self) -> InferenceSettings:
        """This service's settings (read from the environment on first use)."""
        if self._settings is None:
            self._settings = InferenceSettings()
        return self._settings

    @property
    def worker(self) -> InferenceWorker | None:
        """The running worker, if started."""
        return self._worker

    @property
    def triton_url(self) -> str:
        """Triton's gRPC endpoint: the local server's when this service starts it."""
        settings = self.settings
        return f"127.0.0.1:{settings.local_grpc_port}" if settings.triton_local else settings.triton_url

    def companion_command(self, settings: CoreSettings) -> list[str] | None:
        """The local Triton server, started once per host by ``lucerna up``/``lucerna serve``
        (None when Triton runs elsewhere, ``LUCERNA_INFERENCE_TRITON_LOCAL=false``)."""
        if not self.settings.triton_local:
            return None
        # Inherited by the companion and by the worker processes forked after it.
        os.environ[COMPANION_MARK] = "1"
        os.environ.setdefault(local_triton.ACCESS_TOKEN_VARIABLE, secrets.token_urlsafe(24))
        return self._local_command(self.settings.models)

    def _local_command(self, models: Sequence[str]) -> list[str]:
        settings = self.settings
        return local_triton.command(
            settings.model_repository.resolve(),
            grpc_port=settings.local_grpc_port,
            http_port=settings.local_http_port,
            metrics_port=settings.local_metrics_port,
            models=models,
            onnx_threads=settings.local_onnx_threads,
        )

    async def readiness(self) -> dict[str, bool]:
        """Started, Triton answering with the models, the result store reachable."""
        worker, results = self._worker, self._results
        return {
            "triton": worker is not None and worker.triton_ready,
            "results": results is not None and await results.ping(),
        }

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        """``GET /api/models`` and ``GET /api/results/{job_id}``."""

        async def models(request: Request) -> Response:
            resources.auth.require(request, "Device", "read")
            client = self._client
            ready = (
                await asyncio.gather(*(client.ready(m) for m in self._manifests.values())) if client else []
            )
            server = await client.server_ready() if client else False
            return JSONResponse(
                {
                    "triton": {
                        "url": self.triton_url,
                        "ready": server,
                        "local": self.settings.triton_local,
                        "shared_memory": bool(client and client.uses_shared_memory),
                    },
                    "models": [
                        {**_describe(manifest), "ready": bool(is_ready)}
                        for manifest, is_ready in zip(
                            self._manifests.values(), ready or [False] * len(self._manifests), strict=True
                        )
                    ],
                }
            )

        async def result(request: Request) -> Response:
            resources.auth.require(request, "Observation", "read")
            if self._results is None:
                raise HTTPException(503, "the inference service is not started")
            job_id = request.path_params["job_id"]
            stored = await self._results.get(job_id)
            if stored is None:
                raise HTTPException(404, f"no result for job {job_id}")
            return JSONResponse(
                {
                    "job_id": stored.job_id,
                    "completed_published": stored.completed_published,
                    "stored_at": stored.stored_at.isoformat(),
                    "result": json_format.MessageToDict(stored.completed, preserving_proto_field_name=True),
                }
            )

        return [Route("/api/models", models), Route("/api/results/{job_id}", result)]

    async def start(self, resources: Resources) -> None:
        """Load the manifests, bring Triton up (or find it), check the models, then start consuming."""
        settings = self.settings
        manifests = load_repository(settings.model_repository)
        unknown = sorted(set(settings.models) - set(manifests))
        if unknown:
            raise StartupError(
                f"LUCERNA_INFERENCE_MODELS names {unknown}, not in {settings.model_repository}"
                f" ({sorted(manifests)})"
            )
        self._manifests = {name: manifests[name] for name in settings.models or sorted(manifests)}
        self._client = self._triton_client(None)
        try:
            # The local Triton's token of the restricted shared-memory protocol, when this process
            # knows it (it started that Triton, or the runner did): inputs then skip the gRPC copy.
            token = os.environ.get(local_triton.ACCESS_TOKEN_VARIABLE) if settings.triton_local else None
            if settings.triton_local and os.environ.get(COMPANION_MARK) != "1":
                if await self._serves_models():
                    log.info("using the Triton already serving the models", extra={"url": self.triton_url})
                    token = None
                else:
                    token = secrets.token_urlsafe(24)
                    await self._spawn_local_triton(resources.settings.data_dir, token)
            if token and settings.triton_shared_memory:
                await self._client.close()
                self._client = self._triton_client(token)
                log.info("inputs go to the local Triton in shared memory", extra={"url": self.triton_url})
            ready = await self._wait_for_triton(settings.triton_start_timeout_seconds)
            if ready:
                await self._check_models()
            else:
                log.warning(
                    "Triton is not ready; starting anyway, jobs wait for it",
                    extra={"triton_url": self.triton_url},
                )
            self._results = _result_store(resources)
            await self._results.start()
        except BaseException:
            await self.stop()
            raise
        self._worker = InferenceWorker(
            Ports(
                bus=resources.bus,
                blobs=resources.blobs,
                results=self._results,
                backend=self._client,
                audit=resources.audit_trail,
            ),
            self._manifests,
            worker_name=settings.worker_name,
            slots=settings.processing_slots,
            backoff_min=settings.triton_backoff_min_seconds,
            backoff_max=settings.triton_backoff_max_seconds,
        )
        self._worker.set_triton_ready(ready)
        await self._worker.start()
        await resources.bus.consume(STAT_QUEUE, self._worker.handle, prefetch=settings.stat_prefetch)
        await resources.bus.consume(ROUTINE_QUEUE, self._worker.handle, prefetch=settings.routine_prefetch)
        self._tasks = [
            asyncio.create_task(self._relay(settings.outbox_interval_seconds), name="inference-outbox-relay"),
            asyncio.create_task(self._monitor(), name="inference-triton-monitor"),
        ]

    async def stop(self) -> None:
        """Finish or hand back the jobs in flight; stop the relay, Triton's connection, the local server."""
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._results is not None:
            await self._results.close()
            self._results = None
        await self._stop_child()
        self._checked = False

    async def _serves_models(self) -> bool:
        """Whether a Triton already answers on the configured port with every model (one server per host)."""
        assert self._client is not None
        if not await self._client.server_ready():
            return False
        ready = await asyncio.gather(*(self._client.ready(m) for m in self._manifests.values()))
        return all(ready)

    def _triton_client(self, shared_memory_token: str | None) -> TritonClient:
        settings = self.settings
        return TritonClient(
            self.triton_url,
            concurrency=settings.triton_concurrency,
            batch_size=settings.batch_size,
            request_timeout=settings.triton_request_timeout_seconds,
            shared_memory_token=shared_memory_token,
            shared_memory_regions=settings.triton_concurrency * settings.processing_slots,
        )

    async def _spawn_local_triton(self, data_dir: Path, token: str) -> None:
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        log_path = data_dir / "local-triton.log"
        line = self._local_command(list(self._manifests))
        environment = local_triton.library_path_environment() or dict(os.environ)
        environment[local_triton.ACCESS_TOKEN_VARIABLE] = token
        output = await asyncio.to_thread(log_path.open, "ab")
        with output:
            self._child = await asyncio.create_subprocess_exec(
                *line,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        self._log_path = log_path
        log.info("started the local Triton server", extra={"pid": self._child.pid, "log": str(log_path)})

    async def _wait_for_triton(self, within: float) -> bool:
        """Wait up to ``within`` seconds for Triton to serve every model; a local server that dies is an error
        unless another one answers on its port."""
        assert self._client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if await self._serves_models():
                return True
            if self._child is not None and self._child.returncode is not None:
                code = self._child.returncode
                self._child = None
                await asyncio.sleep(1.0)  # another process's server may be loading its models
                if await self._serves_models():
                    return True
                raise StartupError(f"the local Triton server exited with {code}:\n{_tail(self._log_path)}")
            await asyncio.sleep(_PROBE_SECONDS)
        return False

    async def _check_models(self) -> None:
        assert self._client is not None
        problems = []
        for manifest in self._manifests.values():
            try:
                await self._client.check_model(manifest)
            except ModelMismatchError as mismatch:
                problems.append(str(mismatch))
        if problems:
            raise StartupError("; ".join(problems))
        self._checked = True

    async def _monitor(self) -> None:
        """Keep the worker's view of Triton current; check the models once Triton first appears."""
        while True:
            await asyncio.sleep(_MONITOR_SECONDS)
            worker, client = self._worker, self._client
            if worker is None or client is None:
                continue
            try:
                ready = all(await asyncio.gather(*(client.ready(m) for m in self._manifests.values())))
                if ready and not self._checked:
                    await self._check_models()
            except (StartupError, TritonUnavailable) as exc:
                log.error("Triton does not serve the models as their manifests say; jobs wait: %s", exc)  # noqa: TRY400
                ready = False
            worker.set_triton_ready(ready)

    async def _relay(self, interval: float) -> None:
        """Publish results stored but not confirmed by the bus, every ``interval`` seconds."""
        while True:
            worker = self._worker
            if worker is not None:
                try:
                    relayed = await worker.relay_unpublished()
                    if relayed:
                        log.info("published %d stored results again", relayed)
                except Exception:
                    log.exception("result outbox relay failed; retrying")
            await asyncio.sleep(interval)

    async def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), _CHILD_STOP_SECONDS)
        except TimeoutError:
            log.warning("the local Triton server did not stop in time; killing it", extra={"pid": child.pid})
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()


def _result_store(resources: Resources) -> ResultStore:
    settings = resources.settings
    if settings.metadata_backend == "mongodb":
        return MongoResultStore(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    return SqliteResultStore(settings.data_dir / "inference.sqlite")


def _describe(manifest: Manifest) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "version": manifest.version,
        "title": manifest.title,
        "task": manifest.task,
        "weights_sha256": manifest.weights.sha256,
        "max_batch_size": manifest.max_batch_size,
        "inputs": [spec.model_dump() for spec in manifest.inputs],
        "outputs": [spec.model_dump() for spec in manifest.outputs],
        "finding": manifest.finding.code.model_dump(),
    }


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(no log)"
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


SERVICE = InferenceService()
