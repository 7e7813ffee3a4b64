"""The worker and the service against the real local Triton (and RabbitMQ where the bus matters)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.bootstrap import build_resources
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.http import create_app
from lucerna.core.model_manifest import Manifest, load_repository
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2
from lucerna.inference import synthetic
from lucerna.inference.results import SqliteResultStore
from lucerna.inference.service import InferenceService
from lucerna.inference.settings import InferenceSettings
from lucerna.inference.triton import TritonClient
from lucerna.inference.worker import InferenceWorker, Ports, requested_routing_key
from tests.conftest import LocalTriton
from tests.unit.inference.inference_kit import Blobs, RecordingBus

REPOSITORY = Path(__file__).resolve().parents[3] / "infra" / "triton" / "models"
MODEL = "lung-nodule-detector"
SLICES = 24


@dataclass
class Env:
    bus: RecordingBus
    blobs: Blobs
    results: SqliteResultStore
    worker: InferenceWorker
    manifests: dict[str, Manifest]


def refs_of(study: synthetic.SyntheticStudy, blobs: Blobs) -> list[events_pb2.InstanceRef]:
    refs = []
    for data in study.instances:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        refs.append(
            events_pb2.InstanceRef(
                sop_instance_uid=ds.SOPInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                sha256=blobs.put(data),
                modality="CT",
                body_part="CHEST",
            )
        )
    return refs


def request(study_uid: str, refs: list[events_pb2.InstanceRef], model: str = MODEL) -> Envelope:
    job_id = generate_uid().replace(".", "")[-32:].rjust(32, "0")
    message = events_pb2.InferenceRequested(
        job_id=job_id,
        attempt=1,
        study_instance_uid=study_uid,
        model=model,
        model_version="1",
        priority=events_pb2.ROUTINE,
        instance_set_sha256="ab" * 32,
        instances=refs,
        requested_at=datetime.now(UTC),
        timeout_seconds=600,
    )
    return codec.encode(
        requested_routing_key(events_pb2.ROUTINE, model),
        message,
        correlation_id=job_id,
        message_id=f"inference-requested:{job_id}:1",
    )


def job_of(envelope: Envelope) -> str:
    return codec.decode(envelope, events_pb2.InferenceRequested).job_id


def completed_of(bus: RecordingBus, job_id: str) -> list[events_pb2.InferenceCompleted]:
    messages = (codec.decode(e, events_pb2.InferenceCompleted) for e in bus.of("inference.completed"))
    return [m for m in messages if m.job_id == job_id]


@pytest.fixture(scope="module")
def chest() -> synthetic.SyntheticStudy:
    return synthetic.chest_study(11, slices=SLICES)


@pytest.fixture
async def env(triton: LocalTriton, tmp_path: Path) -> AsyncIterator[Env]:
    bus = RecordingBus()
    await bus.start()
    results = SqliteResultStore(tmp_path / "inference.sqlite")
    await results.start()
    client = TritonClient(triton.grpc_url)
    manifests = load_repository(REPOSITORY)
    blobs = Blobs()
    worker = InferenceWorker(
        Ports(bus, blobs, results, client, BusAuditTrail(bus)),
        manifests,
        worker_name="it-worker",
        slots=2,
        backoff_min=0.2,
        backoff_max=1.0,
    )
    await worker.start()
    yield Env(bus, blobs, results, worker, manifests)
    await worker.stop()
    await client.close()
    await bus.close()
    await results.close()


async def test_a_synthetic_ct_study_yields_one_stored_result_and_one_completed_event(
    env: Env, chest: synthetic.SyntheticStudy
) -> None:
    refs = refs_of(chest, env.blobs)
    envelope = request(chest.study_uid, refs)
    await asyncio.wait_for(env.worker.handle(envelope), 120)
    await asyncio.wait_for(env.worker.handle(envelope), 120)  # redelivered: no second result
    job_id = job_of(envelope)
    stored = await env.results.get(job_id)
    assert stored is not None and stored.completed_published
    completed = completed_of(env.bus, job_id)
    assert len(completed) == 2 and completed[0] == completed[1] == stored.completed
    result = stored.completed
    assert result.weights_sha256 == env.manifests[MODEL].weights.sha256
    assert len(result.sop_instance_uids) == SLICES
    assert result.patient_id == "SYN00000011"
    sops = {ref.sop_instance_uid for ref in refs}
    for finding in result.findings:
        assert finding.code == "786838002"
        for location in finding.locations:
            assert location.sop_instance_uid in sops
            assert 0 <= location.x_min < location.x_max <= 512
    assert result.timings.inference_ms > 0
    assert len(env.bus.of("inference.started")) == 1


async def test_undecodable_pixels_fail_the_job_and_the_next_one_is_served(
    env: Env, chest: synthetic.SyntheticStudy
) -> None:
    refs = refs_of(chest, env.blobs)[:4]
    truncated = env.blobs.data[refs[2].sha256][:-5000]
    refs[2].sha256 = env.blobs.put(truncated)
    bad = request(chest.study_uid, refs)
    await asyncio.wait_for(env.worker.handle(bad), 60)
    (failed,) = [codec.decode(e, events_pb2.InferenceFailed) for e in env.bus.of("inference.failed")]
    assert failed.job_id == job_of(bad)
    assert f"undecodable pixels: instance {refs[2].sop_instance_uid}" in failed.reason
    good = request(chest.study_uid, refs_of(chest, env.blobs)[:4], model="lung-nodule-detector-int8")
    await asyncio.wait_for(env.worker.handle(good), 60)
    assert len(completed_of(env.bus, job_of(good))) == 1


async def test_the_service_over_rabbitmq(
    triton: LocalTriton, rabbitmq_url: str, tmp_path: Path, chest: synthetic.SyntheticStudy
) -> None:
    resources = build_resources(
        CoreSettings(bus_backend="rabbitmq", rabbitmq_url=rabbitmq_url, data_dir=tmp_path, workers=1)
    )
    # triton_local with the fixture's port: the service finds that server and uses it (one per host).
    service = InferenceService(
        InferenceSettings(
            model_repository=REPOSITORY,
            triton_local=True,
            local_grpc_port=triton.grpc_port,
            local_http_port=triton.http_port,
            local_metrics_port=triton.metrics_port,
        )
    )
    events: list[Envelope] = []

    async def collect(envelope: Envelope) -> None:
        events.append(envelope)

    await resources.bus.start()
    await service.start(resources)
    try:
        assert service.worker is not None and service.worker.triton_ready
        await resources.bus.consume("orchestrator.job-events", collect)
        refs = []
        for ref, data in zip(refs_of(chest, Blobs()), chest.instances, strict=True):
            stored = await resources.blobs.put(data)
            assert stored.sha256 == ref.sha256
            refs.append(ref)
        envelope = request(chest.study_uid, refs)
        await resources.bus.publish(envelope)
        job_id = job_of(envelope)
        for _ in range(600):
            if any(e.routing_key == "inference.completed" for e in events):
                break
            await asyncio.sleep(0.1)
        assert [e.routing_key for e in events] == ["inference.started", "inference.completed"]
        app = create_app(resources, [service])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            models = (await http.get("/api/models")).json()
            assert {m["name"]: m["ready"] for m in models["models"]} == {
                "head-ct-hemorrhage": True,
                "lung-nodule-detector": True,
                "lung-nodule-detector-int8": True,
            }
            answer = await http.get(f"/api/results/{job_id}")
            assert answer.status_code == 200
            assert answer.json()["result"]["job_id"] == job_id
            assert answer.json()["completed_published"] is True
            assert (await http.get("/api/results/" + "0" * 32)).status_code == 404
    finally:
        await service.stop()
        await resources.bus.close()


async def test_triton_down_holds_the_job_until_triton_is_back(
    env: Env, triton: LocalTriton, chest: synthetic.SyntheticStudy
) -> None:
    # Last in this module: it stops and restarts the session's Triton.
    await asyncio.to_thread(triton.stop)
    envelope = request(chest.study_uid, refs_of(chest, env.blobs)[:6])
    handler = asyncio.create_task(env.worker.handle(envelope))
    try:
        await asyncio.sleep(3)
        assert not handler.done()
        assert not env.worker.triton_ready
        assert env.bus.of("inference.failed") == []
    finally:
        await asyncio.to_thread(triton.start)
    await asyncio.wait_for(handler, 120)
    assert env.worker.triton_ready
    assert len(completed_of(env.bus, job_of(envelope))) == 1
