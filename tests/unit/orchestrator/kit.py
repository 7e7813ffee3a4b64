"""What the orchestrator's tests build on: a model repository, study.ready events and worker reports."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from lucerna.core.auth import Authenticator
from lucerna.core.events import codec
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.events.ports import Envelope, PermanentError
from lucerna.core.events.topology import INFERENCE_COMPLETED, INFERENCE_FAILED, INFERENCE_STARTED, STUDY_READY
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from lucerna.events.v1 import events_pb2
from lucerna.orchestrator.jobs import Job, JobState
from lucerna.orchestrator.service import OrchestratorService
from lucerna.orchestrator.settings import OrchestratorSettings
from lucerna.orchestrator.workflow import Workflow

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
MODELS = {"lung-nodule-detector": "1", "head-ct-hemorrhage": "2", "lung-nodule-detector-int8": "1"}
SHIPPED_RULES = Path(__file__).resolve().parents[3] / (
    "services/orchestrator/src/lucerna/orchestrator/default_rules.yaml"
)

_MANIFEST = """\
name: {name}
version: "{version}"
title: {name} (test)
task: detection
weights:
  file: 1/model.onnx
  sha256: "{sha}"
max_batch_size: 4
inputs: [{{name: image, datatype: UINT8, shape: [3, 64, 64]}}]
outputs: [{{name: detections, datatype: FP32, shape: [100, 5]}}]
preprocessing: {{window: {{center: -600, width: 1500}}, size: [64, 64], context_slices: 1}}
postprocessing:
  score_threshold: 0.5
  nms_iou: 0.3
  group_slices: true
  max_findings: 10
  aggregate: none
finding:
  code: {{system: "http://snomed.info/sct", code: "427359005", display: Lung nodule}}
  body_site: {{system: "http://snomed.info/sct", code: "39607008", display: Lung}}
  measurements: [diameter]
"""


def write_model_repository(folder: Path, models: Mapping[str, str] = MODELS) -> Path:
    """A model repository with a manifest per model (no weights: the orchestrator reads no weights)."""
    for name, version in models.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        manifest = _MANIFEST.format(name=name, version=version, sha="0" * 64)
        (folder / name / "lucerna.yaml").write_text(manifest)
    return folder


def instance(
    sop: str, series: str = "1.9.1", modality: str = "CT", body_part: str = "CHEST", sop_class: str = CT
) -> events_pb2.InstanceRef:
    """One instance reference; its SHA-256 derives from its UID."""
    return events_pb2.InstanceRef(
        sop_instance_uid=sop,
        series_instance_uid=series,
        sop_class_uid=sop_class,
        sha256=hashlib.sha256(sop.encode()).hexdigest(),
        modality=modality,
        body_part=body_part,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def chest_instances(study: str, count: int = 3) -> list[events_pb2.InstanceRef]:
    """CT chest slices of one series."""
    return [instance(f"{study}.1.{n}", series=f"{study}.1") for n in range(1, count + 1)]


def head_instances(study: str, count: int = 2, body_part: str = "HEAD") -> list[events_pb2.InstanceRef]:
    """CT head slices of one series."""
    return [instance(f"{study}.2.{n}", series=f"{study}.2", body_part=body_part) for n in range(1, count + 1)]


def study_ready(
    study: str,
    instances: Sequence[events_pb2.InstanceRef],
    *,
    burst: int = 1,
    description: str = "CT CHEST",
    calling_ae_titles: Sequence[str] = ("CT1",),
) -> Envelope:
    """The ``study.ready`` of a burst, its study-level lists derived from the instances."""
    message = events_pb2.StudyReady(
        study_instance_uid=study,
        burst=burst,
        burst_instances=len(instances),
        total_instances=len(instances),
        patient_id="PID-1",
        modalities=sorted({i.modality for i in instances}),
        sources=["dimse:CT1@10.0.0.5"],
        ready_at=datetime.now(UTC),
        study_description=description,
        body_parts=sorted({i.body_part for i in instances if i.body_part}),
        sop_class_uids=sorted({i.sop_class_uid for i in instances}),
        calling_ae_titles=list(calling_ae_titles),
        instances=list(instances),
    )
    return codec.encode(STUDY_READY, message, correlation_id=study, message_id=f"study-ready:{study}:{burst}")


def started(job_id: str, attempt: int = 1, worker: str = "worker-1", at: datetime | None = None) -> Envelope:
    """A worker's ``inference.started``."""
    message = events_pb2.InferenceStarted(
        job_id=job_id, attempt=attempt, worker=worker, started_at=at or datetime.now(UTC)
    )
    return codec.encode(
        INFERENCE_STARTED, message, correlation_id=job_id, message_id=f"inference-started:{job_id}:{attempt}"
    )


def completed(
    job_id: str, attempt: int = 1, result_id: str = "result-1", at: datetime | None = None
) -> Envelope:
    """A worker's ``inference.completed``."""
    message = events_pb2.InferenceCompleted(
        job_id=job_id,
        attempt=attempt,
        result_id=result_id,
        weights_sha256="ab" * 32,
        completed_at=at or datetime.now(UTC),
    )
    return codec.encode(
        INFERENCE_COMPLETED, message, correlation_id=job_id, message_id=f"inference-completed:{job_id}"
    )


def failed(job_id: str, attempt: int = 1, reason: str = "pixel data cannot be decoded") -> Envelope:
    """A worker's ``inference.failed``."""
    message = events_pb2.InferenceFailed(
        job_id=job_id, attempt=attempt, reason=reason, failed_at=datetime.now(UTC)
    )
    return codec.encode(
        INFERENCE_FAILED, message, correlation_id=job_id, message_id=f"inference-failed:{job_id}:{attempt}"
    )


@dataclass
class Orchestra:
    """A running orchestrator on the embedded adapters, with a scripted worker on the inference
    queues (it records every request and acknowledges it, or refuses the jobs in ``poison``)."""

    resources: Resources
    service: OrchestratorService
    client: httpx.AsyncClient
    requests: list[Envelope] = field(default_factory=list)
    poison: set[str] = field(default_factory=set)  # job ids the worker refuses (PermanentError)

    @property
    def workflow(self) -> Workflow:
        running = self.service.workflow
        assert running is not None
        return running

    def requested(self) -> list[events_pb2.InferenceRequested]:
        return [codec.decode(e, events_pb2.InferenceRequested) for e in self.requests]

    async def publish(self, envelope: Envelope) -> None:
        await self.resources.bus.publish(envelope)

    async def until(self, condition: Callable[[], Awaitable[object] | object], seconds: float = 5.0) -> None:
        """Wait until ``condition`` (sync or async) is true."""
        async with asyncio.timeout(seconds):
            while True:
                value = condition()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return
                await asyncio.sleep(0.005)

    async def job(self, job_id: str) -> Job:
        job = await self.workflow.store.get_job(job_id)
        assert job is not None, job_id
        return job

    async def job_in(self, job_id: str, state: JobState) -> Job:
        """The job once it reached ``state``."""
        await self.until(lambda: self._has_state(job_id, state))
        return await self.job(job_id)

    async def _has_state(self, job_id: str, state: JobState) -> bool:
        job = await self.workflow.store.get_job(job_id)
        return job is not None and job.state is state


def orchestrator_settings(tmp_path: Path, **changes: Any) -> OrchestratorSettings:
    """Settings on a test model repository with the shipped rules; no backoff, a long sweep interval
    (tests sweep by hand)."""
    values: dict[str, Any] = {
        "model_repository": write_model_repository(tmp_path / "models"),
        "rules_file": SHIPPED_RULES,
        "retry_backoff_seconds": 0,
        "sweep_interval_seconds": 3600,
        "job_timeout_seconds": 60,
    }
    return OrchestratorSettings(**(values | changes))


def embedded_resources(tmp_path: Path, **core: Any) -> Resources:
    """The embedded adapters (SQLite, in-process bus with fast retries) in a test's folder."""
    config = CoreSettings(data_dir=tmp_path, **core)
    return Resources(
        settings=config,
        auth=Authenticator(config),
        bus=InProcessBus(retry_base_delay=0.001, retry_max_delay=0.002, shutdown_grace=1),
        blobs=FilesystemBlobStore(tmp_path / "blobs"),
        metadata=SqliteMetadataStore(tmp_path / "metadata.sqlite"),
        search=SqliteSearchIndex(tmp_path / "search.sqlite"),
    )


@asynccontextmanager
async def running(resources: Resources, settings: OrchestratorSettings) -> AsyncIterator[Orchestra]:
    """The orchestrator's app started (lifespan included), its worker consuming, an HTTP client on it."""
    service = OrchestratorService(settings)
    app = create_app(resources, [service])
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator")
        orchestra = Orchestra(resources, service, client)

        async def work(envelope: Envelope) -> None:
            orchestra.requests.append(envelope)
            request = codec.decode(envelope, events_pb2.InferenceRequested)
            if request.job_id in orchestra.poison:
                raise PermanentError(f"cannot decode the pixels of job {request.job_id}")

        for queue in ("inference.stat", "inference.routine"):
            await resources.bus.consume(queue, work)
        async with client:
            yield orchestra
