"""From a stored study to its findings, on the real servers, when things go wrong.

The imaging store and the orchestrator run as `lucerna up --only ingestion,metadata,orchestrator`;
the inference worker runs alone (`lucerna serve inference`, one process) against the session's
real Triton, so that it can be killed and restarted on its own. Every platform of this module uses
a RabbitMQ virtual host and a database of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import aio_pika
import httpx
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless
from pymongo import MongoClient

from lucerna.core.events.topology import EXCHANGE, INFERENCE_COMPLETED, INFERENCE_REQUESTED_ROUTINE
from lucerna.events.v1 import events_pb2
from lucerna.inference import synthetic
from tests.e2e.platform import LucernaProcess, real_server_settings

pytestmark = pytest.mark.e2e

DATABASE = "e2e_inference_reliability"
BOUNDARY = "lucerna-e2e"
DETECTOR = "lung-nodule-detector"


@dataclass
class Stack:
    """The platform (imaging store + orchestrator) and the inference worker, on shared servers."""

    platform: LucernaProcess
    worker: LucernaProcess
    rabbitmq_url: str
    mongodb_url: str
    completed: list[tuple[str, events_pb2.InferenceCompleted]] = field(default_factory=list)

    def jobs(self, study_uid: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.platform.base_url}/api/jobs", params={"study": study_uid}, timeout=10)
        response.raise_for_status()
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    async def wait_for_jobs(
        self, study_uid: str, states: set[str], *, count: int = 1, within: float = 120
    ) -> list[dict[str, Any]]:
        """The study's jobs once ``count`` of them exist and all are in one of ``states``."""
        deadline = time.monotonic() + within
        jobs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            jobs = await asyncio.to_thread(self.jobs, study_uid)
            if len(jobs) >= count and all(job["state"] in states for job in jobs):
                return jobs
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"jobs of {study_uid} not {states} after {within}s: {jobs}\n"
            f"worker log:\n{self.worker.log_tail()}\nplatform log:\n{self.platform.log_tail()}"
        )

    def stored_results(self, job_id: str) -> list[dict[str, Any]]:
        """The worker's stored results for a job, read straight from its collection."""
        with MongoClient(self.mongodb_url) as client:
            return list(client[DATABASE]["inference_results"].find({"_id": job_id}))

    def result(self, job_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.worker.base_url}/api/results/{job_id}", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()["result"]
        return result


def stow(platform: LucernaProcess, instances: list[bytes]) -> None:
    """Send instances by STOW-RS in requests of 10."""
    for start in range(0, len(instances), 10):
        body = b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            for data in instances[start : start + 10]
        )
        response = httpx.post(
            f"{platform.dicomweb}/studies",
            content=body + f"--{BOUNDARY}--\r\n".encode(),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'},
            timeout=60,
        )
        assert response.status_code == 200, response.text


def undecodable(instance: bytes) -> bytes:
    """The same instance claiming JPEG 2000, with fragments that are not a JPEG 2000 code stream."""
    dataset = pydicom.dcmread(BytesIO(instance))
    dataset.file_meta.TransferSyntaxUID = JPEG2000Lossless
    dataset.PixelData = encapsulate([b"\x00not a JPEG 2000 code stream\x00" * 8])
    dataset["PixelData"].VR = "OB"
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def stack(
    rabbitmq: Any,
    mongodb_url: str,
    elasticsearch_url: str,
    triton: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    rabbitmq_url = rabbitmq.vhost_url(DATABASE)
    with MongoClient(mongodb_url) as client:
        client.drop_database(DATABASE)
    base = tmp_path_factory.mktemp("inference-reliability")
    shared = real_server_settings(mongodb_url, elasticsearch_url, rabbitmq_url, DATABASE) | {
        "LUCERNA_BLOB_DIR": str(base / "blobs"),
        "LUCERNA_WORKERS": "1",
    }
    platform = LucernaProcess(
        base / "platform",
        # Long enough that a study sent in several STOW-RS requests is one burst on a loaded machine
        # (one job per study, as the tests expect).
        shared | {"LUCERNA_INGESTION_QUIET_PERIOD_SECONDS": "1.5"},
        only=["ingestion", "metadata", "orchestrator"],
    )
    worker = LucernaProcess(
        base / "worker",
        shared
        | {
            "LUCERNA_INFERENCE_TRITON_LOCAL": "false",
            "LUCERNA_INFERENCE_TRITON_URL": triton.grpc_url,
            # One slice per request, one request at a time: a job lasts long enough to be killed in.
            "LUCERNA_INFERENCE_BATCH_SIZE": "1",
            "LUCERNA_INFERENCE_TRITON_CONCURRENCY": "1",
            "LUCERNA_INFERENCE_MODELS": DETECTOR,
        },
        serve="inference",
    )
    platform.start(timeout=180)
    worker.start(timeout=180)
    yield Stack(platform, worker, rabbitmq_url, mongodb_url)
    worker.stop()
    platform.stop()


@pytest.fixture(scope="module")
async def spy(stack: Stack) -> AsyncIterator[Stack]:
    """Every ``inference.completed`` event, with its message id, as a consumer of its own sees it."""
    connection = await aio_pika.connect_robust(stack.rabbitmq_url)
    channel = await connection.channel()
    exchange = await channel.get_exchange(EXCHANGE)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, INFERENCE_COMPLETED)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            event = events_pb2.InferenceCompleted.FromString(message.body)
            stack.completed.append((message.message_id or "", event))

    await queue.consume(on_message)
    yield stack
    await connection.close()


async def test_a_chest_ct_gets_one_result_with_its_model_and_timings(spy: Stack) -> None:
    study = synthetic.chest_study(seed=101, slices=24)
    await asyncio.to_thread(stow, spy.platform, study.instances)

    [job] = await spy.wait_for_jobs(study.study_uid, {"succeeded"})
    assert (job["model"], job["attempt"], job["instance_count"]) == (DETECTOR, 1, 24)
    result = await asyncio.to_thread(spy.result, job["job_id"])
    assert result["model"] == DETECTOR and len(result["weights_sha256"]) == 64
    assert result["study_instance_uid"] == study.study_uid
    sops = {
        finding_location["sop_instance_uid"]
        for f in result.get("findings", [])
        for finding_location in f["locations"]
    }
    assert sops <= set(result["sop_instance_uids"])
    await asyncio.sleep(0.5)
    ours = [(mid, e) for mid, e in spy.completed if e.job_id == job["job_id"]]
    assert {mid for mid, _ in ours} == {f"inference-completed:{job['job_id']}"}


async def test_a_poison_message_is_dead_lettered_with_its_reason_and_work_goes_on(spy: Stack) -> None:
    connection = await aio_pika.connect_robust(spy.rabbitmq_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                b"\xff\xfe this is not a protobuf message",
                message_id="poison-1",
                content_type="application/protobuf",
                type="lucerna.events.v1.InferenceRequested",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            f"{INFERENCE_REQUESTED_ROUTINE}.{DETECTOR}",
        )
    finally:
        await connection.close()

    deadline = time.monotonic() + 30
    letters: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not letters:
        answer = await asyncio.to_thread(httpx.get, f"{spy.platform.base_url}/api/jobs/dead-letters")
        letters = [d for d in answer.json()["dead_letters"] if d.get("message_id") == "poison-1"]
        await asyncio.sleep(0.2)
    assert letters, "the poison message never showed in /api/jobs/dead-letters"
    assert "not a valid lucerna.events.v1.InferenceRequested" in letters[0]["reason"], letters

    study = synthetic.chest_study(seed=102, slices=8)
    await asyncio.to_thread(stow, spy.platform, study.instances)
    await spy.wait_for_jobs(study.study_uid, {"succeeded"})


async def test_undecodable_pixels_fail_the_job_with_the_reason_and_the_worker_serves_the_next(
    spy: Stack,
) -> None:
    broken = synthetic.chest_study(seed=103, slices=6)
    await asyncio.to_thread(stow, spy.platform, [undecodable(data) for data in broken.instances])
    [job] = await spy.wait_for_jobs(broken.study_uid, {"failed"})
    assert "decod" in (job["last_error"] or "").lower(), job

    study = synthetic.chest_study(seed=104, slices=8)
    await asyncio.to_thread(stow, spy.platform, study.instances)
    await spy.wait_for_jobs(study.study_uid, {"succeeded"})


async def test_a_worker_killed_in_the_middle_of_a_job_completes_it_once_after_restart(spy: Stack) -> None:
    study = synthetic.chest_study(seed=105, slices=100)
    await asyncio.to_thread(stow, spy.platform, study.instances)
    [job] = await spy.wait_for_jobs(study.study_uid, {"running"}, within=60)
    spy.worker.kill()
    assert spy.stored_results(job["job_id"]) == [], "the job finished before the kill: nothing was tested"

    await asyncio.to_thread(spy.worker.start, 180)
    [done] = await spy.wait_for_jobs(study.study_uid, {"succeeded"})
    assert done["attempt"] == 1  # the broker redelivered the request: no timeout, no second job
    assert len(spy.stored_results(job["job_id"])) == 1
    await asyncio.sleep(0.5)
    ids = {mid for mid, event in spy.completed if event.study_instance_uid == study.study_uid}
    assert ids == {f"inference-completed:{job['job_id']}"}


async def test_jobs_in_flight_while_rabbitmq_restarts_all_complete_once(spy: Stack, rabbitmq: Any) -> None:
    studies = [synthetic.chest_study(seed=110 + n, slices=20) for n in range(3)]
    for study in studies:
        await asyncio.to_thread(stow, spy.platform, study.instances)
    await spy.wait_for_jobs(studies[-1].study_uid, {"queued", "running", "succeeded"})

    await asyncio.to_thread(rabbitmq.restart)

    for study in studies:
        [job] = await spy.wait_for_jobs(study.study_uid, {"succeeded"}, within=180)
        assert len(spy.stored_results(job["job_id"])) == 1
    assert {len(spy.jobs(s.study_uid)) for s in studies} == {1}
