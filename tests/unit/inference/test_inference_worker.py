"""The worker with fakes: a fake Triton port, the in-process bus and the SQLite result store."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope, PermanentError
from lucerna.core.model_manifest import Manifest
from lucerna.events.v1 import events_pb2
from lucerna.inference.results import SqliteResultStore
from lucerna.inference.triton import Batches, TritonUnavailable
from lucerna.inference.worker import HandedBackError, InferenceWorker, Ports, requested_routing_key
from tests.unit.inference.inference_kit import (
    CLASSIFIER,
    DETECTOR,
    Blobs,
    RecordingBus,
    ct_instance,
    manifest,
)

WAIT = 5.0


@dataclass
class FakeTriton:
    """Detector: a box on each slice whose centre channel is bright; classifier: brightness as probability."""

    available: bool = True
    gate: asyncio.Event | None = None
    calls: list[str] = field(default_factory=list)  # "<model>:<centre level of the first slice>" per call
    attempts: int = 0

    async def ready(self, manifest: Manifest) -> bool:
        return self.available

    async def infer(self, manifest: Manifest, inputs: Batches) -> np.ndarray:
        self.attempts += 1
        if not self.available:
            raise TritonUnavailable("Triton at fake:8001 is unavailable: connection refused")
        batch = inputs.batch(0, len(inputs))
        self.calls.append(f"{manifest.name}:{int(batch[0, batch.shape[1] // 2].mean())}")
        if self.gate is not None:
            await self.gate.wait()
        centre = batch[:, batch.shape[1] // 2].reshape(len(batch), -1).mean(axis=1)
        if manifest.task == "classification":
            return (centre / 255.0).astype(np.float32).reshape(-1, 1)
        out = np.zeros((len(batch), 10, 5), np.float32)
        out[:, 0] = [8, 8, 16, 16, 0]
        out[:, 0, 4] = np.where(centre > 128, 0.9, 0.1)
        return out


@dataclass
class Env:
    bus: RecordingBus
    blobs: Blobs
    results: SqliteResultStore
    triton: FakeTriton
    worker: InferenceWorker

    def study(
        self, levels: list[int], *, series: str | None = None, study: str = "1.2.840.1"
    ) -> list[events_pb2.InstanceRef]:
        series = series or generate_uid()
        refs = []
        for number, level in enumerate(levels, start=1):
            data = ct_instance(study, series, number, hu=np.full((32, 32), level, np.float32))
            refs.append(
                events_pb2.InstanceRef(
                    sop_instance_uid=dcmread(io.BytesIO(data)).SOPInstanceUID,
                    series_instance_uid=series,
                    sha256=self.blobs.put(data),
                    modality="CT",
                )
            )
        return refs


def request(
    refs: list[events_pb2.InstanceRef],
    *,
    job: str | None = None,
    model: str = "lung-nodule-detector",
    priority: int = events_pb2.ROUTINE,
    attempt: int = 1,
) -> Envelope:
    job_id = job or generate_uid().replace(".", "")[-32:].rjust(32, "0")
    message = events_pb2.InferenceRequested(
        job_id=job_id,
        attempt=attempt,
        study_instance_uid="1.2.840.1",
        model=model,
        model_version="1",
        priority=priority,
        instance_set_sha256="ab" * 32,
        instances=refs,
        requested_at=datetime.now(UTC),
        timeout_seconds=600,
    )
    return codec.encode(
        requested_routing_key(priority, model),
        message,
        correlation_id=job_id,
        message_id=f"inference-requested:{job_id}:{attempt}",
    )


def job_of(envelope: Envelope) -> str:
    return codec.decode(envelope, events_pb2.InferenceRequested).job_id


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    bus = RecordingBus()
    await bus.start()
    results = SqliteResultStore(tmp_path / "inference.sqlite")
    await results.start()
    blobs, triton = Blobs(), FakeTriton()
    manifests = {m.name: m for m in (manifest(DETECTOR), manifest(CLASSIFIER))}
    worker = InferenceWorker(
        Ports(bus, blobs, results, triton, BusAuditTrail(bus)),
        manifests,
        worker_name="test-worker",
        slots=1,
        backoff_min=0.01,
        backoff_max=0.05,
        stop_grace=1.0,
    )
    await worker.start()
    yield Env(bus, blobs, results, triton, worker)
    await worker.stop()
    await bus.close()
    await results.close()


def completed_of(env: Env, job_id: str) -> list[events_pb2.InferenceCompleted]:
    return [
        m
        for m in (codec.decode(e, events_pb2.InferenceCompleted) for e in env.bus.of("inference.completed"))
        if m.job_id == job_id
    ]


async def test_a_job_yields_a_stored_result_and_one_completed_event(env: Env) -> None:
    refs = env.study([-1000, 0, 0, -1000, -1000])  # bright slices 2 and 3: one lesion over two slices
    envelope = request(refs)
    await env.worker.handle(envelope)
    job_id = job_of(envelope)
    stored = await env.results.get(job_id)
    assert stored is not None and stored.completed_published
    (completed,) = completed_of(env, job_id)
    assert completed == stored.completed
    assert env.bus.of("inference.completed")[0].message_id == f"inference-completed:{job_id}"
    assert (completed.model, completed.model_version) == ("lung-nodule-detector", "1")
    assert completed.weights_sha256 == "0" * 64
    assert completed.patient_id == "PID-1"
    assert sorted(completed.sop_instance_uids) == sorted(r.sop_instance_uid for r in refs)
    (finding,) = completed.findings
    assert {loc.sop_instance_uid for loc in finding.locations} == {
        refs[1].sop_instance_uid,
        refs[2].sop_instance_uid,
    }
    assert finding.locations[0].x_max == pytest.approx(16.0)  # 32 x 32 frames: model pixels = frame pixels
    assert finding.measurements[0].value == pytest.approx(8 * 0.7)
    assert completed.timings.total_ms > 0
    (started,) = env.bus.of("inference.started")
    assert started.message_id == f"inference-started:{job_id}:1"
    audits = [codec.decode(e, events_pb2.AuditRecord) for e in env.bus.of("audit.record")]
    assert [a.action for a in audits] == [
        events_pb2.AuditRecord.JOB_STARTED,
        events_pb2.AuditRecord.JOB_FINISHED,
    ]
    assert audits[1].details["findings"] == "1"
    assert audits[1].details["weights_sha256"] == "0" * 64
    assert [e.message_id for e in env.bus.of("audit.record")] == [
        f"audit-job-started:{job_id}:1",
        f"audit-job-finished:{job_id}",
    ]


async def test_a_redelivered_job_publishes_its_result_again_without_running_again(env: Env) -> None:
    envelope = request(env.study([0, 0]))
    await env.worker.handle(envelope)
    await env.worker.handle(envelope)
    await env.worker.handle(
        request(
            list(codec.decode(envelope, events_pb2.InferenceRequested).instances),
            job=job_of(envelope),
            attempt=2,
        )
    )
    assert len(env.triton.calls) == 1
    completed = completed_of(env, job_of(envelope))
    assert len(completed) == 3 and completed[0] == completed[1] == completed[2]
    assert {e.message_id for e in env.bus.of("inference.completed")} == {
        f"inference-completed:{job_of(envelope)}"
    }
    assert len(env.bus.of("inference.started")) == 1


async def test_undecodable_pixels_fail_the_job_and_the_worker_serves_the_next(env: Env) -> None:
    refs = env.study([0, 0])
    broken = bytearray(env.blobs.data[refs[1].sha256])
    del broken[-100:]  # truncated pixel data
    refs[1].sha256 = env.blobs.put(bytes(broken))
    bad = request(refs)
    await env.worker.handle(bad)
    (failed,) = [codec.decode(e, events_pb2.InferenceFailed) for e in env.bus.of("inference.failed")]
    assert failed.job_id == job_of(bad)
    assert failed.reason.startswith(f"undecodable pixels: instance {refs[1].sop_instance_uid}: pixel data")
    assert env.bus.of("inference.failed")[0].message_id == f"inference-failed:{job_of(bad)}:1"
    assert await env.results.get(job_of(bad)) is None
    good = request(env.study([0]))
    await env.worker.handle(good)
    assert len(completed_of(env, job_of(good))) == 1


async def test_missing_bytes_unknown_model_wrong_version_and_no_usable_instance_fail_for_good(
    env: Env,
) -> None:
    refs = env.study([0])
    missing = events_pb2.InstanceRef(sop_instance_uid="1.2.3.9", sha256="cd" * 32)
    sr = dcmread(Path(os.path.dirname(pydicom.data.__file__)) / "test_files" / "test-SR.dcm")
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    report = events_pb2.InstanceRef(
        sop_instance_uid=sr.SOPInstanceUID, sha256=env.blobs.put(buffer.getvalue())
    )
    wrong_version = request(refs)
    wrong_version_body = codec.decode(wrong_version, events_pb2.InferenceRequested)
    wrong_version_body.model_version = "7"
    cases = [
        (request([*refs, missing]), "instance bytes missing: 1.2.3.9 (SHA-256 " + "cd" * 32),
        (request(refs, model="brain-tumour"), "unknown model 'brain-tumour': this worker serves"),
        (
            codec.encode(wrong_version.routing_key, wrong_version_body, correlation_id="x"),
            "model lung-nodule-detector version 7 was requested; this worker serves version 1",
        ),
        (request([report]), "no instance usable by the model among 1 (1 without pixel data)"),
    ]
    for envelope, reason in cases:
        await env.worker.handle(envelope)
        failed = codec.decode(env.bus.of("inference.failed")[-1], events_pb2.InferenceFailed)
        assert failed.reason.startswith(reason), failed.reason
    assert env.triton.calls == []
    assert env.bus.of("inference.completed") == []


async def test_the_largest_series_is_read_and_reports_are_skipped(env: Env) -> None:
    scout = env.study([0])
    axial = env.study([-1000, 0, -1000])
    envelope = request([*scout, *axial])
    await env.worker.handle(envelope)
    (completed,) = completed_of(env, job_of(envelope))
    assert sorted(completed.sop_instance_uids) == sorted(r.sop_instance_uid for r in axial)


async def test_classification_job(env: Env) -> None:
    envelope = request(env.study([-1000, 80, -1000]), model="head-ct-hemorrhage")
    await env.worker.handle(envelope)
    (completed,) = completed_of(env, job_of(envelope))
    (finding,) = completed.findings
    assert finding.display == "Hemorrhage"
    assert finding.probability == pytest.approx(1.0)
    assert (finding.locations[0].x_max, finding.locations[0].y_max) == (32, 32)


async def test_an_unparseable_message_is_permanent(env: Env) -> None:
    good = request(env.study([0]))
    garbage = Envelope(good.routing_key, b"\xff\xff\xff", "m", "c", good.timestamp, good.type)
    with pytest.raises(PermanentError):
        await env.worker.handle(garbage)
    other = codec.encode(good.routing_key, events_pb2.InferenceStarted(job_id="x"), correlation_id="x")
    with pytest.raises(PermanentError, match=r"expected a lucerna\.events\.v1\.InferenceRequested"):
        await env.worker.handle(other)


async def test_stat_jobs_run_before_a_routine_backlog(env: Env) -> None:
    env.triton.gate = asyncio.Event()
    # Each job's centre level tells which it is: routine 10, 20, 30, 40 HU above -600; STAT at 400.
    jobs = [request(env.study([-600 + 10 * n])) for n in range(1, 5)]
    stat = request(env.study([400]), priority=events_pb2.STAT)
    handlers = [asyncio.create_task(env.worker.handle(job)) for job in jobs]
    await asyncio.sleep(0.2)  # the first routine job is running, three wait
    handlers.append(asyncio.create_task(env.worker.handle(stat)))
    await asyncio.sleep(0.05)
    env.triton.gate.set()
    await asyncio.wait_for(asyncio.gather(*handlers), WAIT)
    levels = [int(call.split(":")[1]) for call in env.triton.calls]
    # First the routine job already running, then STAT, then the routine backlog in arrival order.
    assert levels[1] == max(levels)
    assert levels[0] < levels[2] < levels[3] < levels[4]


async def test_triton_down_holds_the_job_until_it_answers_again(env: Env) -> None:
    env.triton.available = False
    envelope = request(env.study([0]))
    handler = asyncio.create_task(env.worker.handle(envelope))
    await asyncio.sleep(0.5)
    assert not handler.done()
    assert not env.worker.triton_ready
    assert env.triton.attempts == 1  # inference is not retried blindly: readiness is polled
    assert env.bus.of("inference.failed") == []
    env.triton.available = True
    await asyncio.wait_for(handler, WAIT)
    assert env.worker.triton_ready
    assert len(completed_of(env, job_of(envelope))) == 1


async def test_triton_down_through_the_bus_burns_no_delivery(env: Env) -> None:
    env.triton.available = False
    deliveries: list[int] = []

    async def handler(envelope: Envelope) -> None:
        deliveries.append(envelope.delivery_count)
        await env.worker.handle(envelope)

    await env.bus.consume("inference.routine", handler, prefetch=2)
    envelope = request(env.study([0]))
    await env.bus.publish(envelope)
    await asyncio.sleep(0.5)
    env.triton.available = True
    for _ in range(100):
        if completed_of(env, job_of(envelope)):
            break
        await asyncio.sleep(0.05)
    assert len(completed_of(env, job_of(envelope))) == 1
    assert deliveries == [0]
    assert env.bus.dead_letters("inference.routine") == []


async def test_stopping_while_triton_is_down_hands_the_message_back(env: Env) -> None:
    env.triton.available = False
    handler = asyncio.create_task(env.worker.handle(request(env.study([0]))))
    queued = asyncio.create_task(env.worker.handle(request(env.study([0]))))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(env.worker.stop(), WAIT)
    with pytest.raises(HandedBackError):
        await handler
    with pytest.raises(HandedBackError):
        await queued
    with pytest.raises(HandedBackError):
        await env.worker.handle(request(env.study([0])))
    assert env.bus.of("inference.failed") == [] and env.bus.of("inference.completed") == []


async def test_a_result_the_bus_refused_is_published_by_the_relay(env: Env) -> None:
    env.bus.refuse.add("inference.completed")
    envelope = request(env.study([0]))
    await env.worker.handle(envelope)  # stored; acknowledged: the outbox has it
    stored = await env.results.get(job_of(envelope))
    assert stored is not None and not stored.completed_published
    assert await env.worker.relay_unpublished() == 0
    env.bus.refuse.clear()
    assert await env.worker.relay_unpublished() == 1
    assert len(completed_of(env, job_of(envelope))) == 1
    stored = await env.results.get(job_of(envelope))
    assert stored is not None and stored.completed_published
    assert await env.worker.relay_unpublished() == 0
