"""The orchestrator on RabbitMQ and FerretDB: one request per model however often a study is
announced, poison requests dead-lettered into the job API, and jobs no worker finishes timed out.

The orchestrator consumes the platform's own queues (``events.topology.DEFAULT``), which other
tests of the session's broker use too: each test purges them first and filters by its own study.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from lucerna.core.auth import Authenticator
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.events.rabbitmq import RabbitMqBus
from lucerna.core.events.topology import DEFAULT
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.mongo import MongoMetadataStore
from lucerna.core.storage.sqlite import SqliteSearchIndex
from lucerna.events.v1 import events_pb2
from lucerna.orchestrator.jobs import JobState
from lucerna.orchestrator.service import OrchestratorService
from lucerna.orchestrator.settings import OrchestratorSettings
from tests.unit.orchestrator.kit import (
    chest_instances,
    head_instances,
    orchestrator_settings,
    started,
    study_ready,
)

pytestmark = pytest.mark.integration


async def purge_platform_queues(url: str) -> None:
    """Empty the platform's queues (declaring the topology first, as a service would)."""
    bus = RabbitMqBus(url)
    await bus.start()
    await bus.close()
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for spec in DEFAULT.queues:
            for name in (spec.name, spec.dead_letter_queue):
                queue = await channel.get_queue(name, ensure=False)
                await queue.purge()


class Deployment:
    """The orchestrator deployed alone on the real servers, an HTTP client on its job API."""

    def __init__(self, resources: Resources, service: OrchestratorService, client: httpx.AsyncClient) -> None:
        self.resources = resources
        self.service = service
        self.client = client

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/api/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def until(self, condition: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
        async with asyncio.timeout(seconds):
            while not await condition():  # noqa: ASYNC110 - polling the API, as an operator would
                await asyncio.sleep(0.05)


@pytest.fixture
def deploy(rabbitmq_url: str, mongodb_url: str, mongodb_database: str, tmp_path: Path) -> Callable[..., Any]:
    """``async with deploy(**orchestrator settings) as deployment``."""

    @asynccontextmanager
    async def deployment(**changes: Any) -> AsyncIterator[Deployment]:
        await purge_platform_queues(rabbitmq_url)
        core = CoreSettings(
            data_dir=tmp_path,
            metadata_backend="mongodb",
            mongodb_url=mongodb_url,  # type: ignore[arg-type]
            mongodb_database=mongodb_database,
            bus_backend="rabbitmq",
            rabbitmq_url=rabbitmq_url,  # type: ignore[arg-type]
        )
        resources = Resources(
            settings=core,
            auth=Authenticator(core),
            bus=RabbitMqBus(rabbitmq_url, retry_base_delay=0.05, retry_max_delay=0.1, shutdown_grace=2),
            blobs=FilesystemBlobStore(tmp_path / "blobs"),
            metadata=MongoMetadataStore(mongodb_url, mongodb_database),
            search=SqliteSearchIndex(tmp_path / "search.sqlite"),
        )
        settings: OrchestratorSettings = orchestrator_settings(tmp_path, **changes)
        service = OrchestratorService(settings)
        app = create_app(resources, [service])
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://orchestrator") as client:
                yield Deployment(resources, service, client)

    return deployment


async def drain(url: str, queue: str, seconds: float) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message that reaches ``queue`` within ``seconds`` (taken off it)."""
    found = []
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            message = await source.get(no_ack=False, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            found.append(message)
    return found


async def test_a_study_announced_twice_gets_one_request_per_model(
    deploy: Callable[..., Any], rabbitmq_url: str
) -> None:
    study = f"2.25.{uuid.uuid4().int}"
    async with deploy() as deployment:
        event = study_ready(study, [*chest_instances(study), *head_instances(study)])
        await deployment.resources.bus.publish(event)
        await deployment.resources.bus.publish(event)  # the same event again (a re-publish)
        reordered = [*head_instances(study), *chest_instances(study)]
        await deployment.resources.bus.publish(study_ready(study, reordered, burst=2))  # same instances
        stat = await drain(rabbitmq_url, "inference.stat", seconds=4)
        routine = await drain(rabbitmq_url, "inference.routine", seconds=1)
        for messages, model in ((stat, "head-ct-hemorrhage"), (routine, "lung-nodule-detector")):
            [message] = messages
            request = events_pb2.InferenceRequested.FromString(message.body)
            assert (request.study_instance_uid, request.model, request.attempt) == (study, model, 1)
            assert message.message_id == f"inference-requested:{request.job_id}:1"
            assert message.correlation_id == request.job_id
            priority = "stat" if messages is stat else "routine"
            assert message.routing_key == f"inference.requested.{priority}.{model}"
            job = await deployment.job(request.job_id)
            assert (job["state"], job["request_published"]) == ("queued", True)
        listed = (await deployment.client.get("/api/jobs", params={"study": study})).json()["jobs"]
        assert len(listed) == 2


async def test_a_poison_request_is_dead_lettered_into_the_job_api(deploy: Callable[..., Any]) -> None:
    study = f"2.25.{uuid.uuid4().int}"
    async with deploy() as deployment:
        bus = deployment.resources.bus

        async def worker(envelope: Envelope) -> None:  # a worker that crashes on every attempt
            raise RuntimeError("segmentation fault in the decoder")

        await bus.consume("inference.stat", worker)
        await bus.publish(study_ready(study, head_instances(study), description="CT HEAD"))

        async def dead_letter_listed() -> bool:
            response = await deployment.client.get("/api/jobs/dead-letters")
            return any(letter["correlation_id"] for letter in response.json()["dead_letters"])

        await deployment.until(dead_letter_listed, seconds=30)
        [letter] = (await deployment.client.get("/api/jobs/dead-letters")).json()["dead_letters"]
        assert (letter["queue"], letter["reason"], letter["attempt"]) == (
            "inference.stat",
            "delivery_limit",
            1,
        )
        assert letter["routing_key"] == "inference.requested.stat.head-ct-hemorrhage"
        assert letter["message_id"] == f"inference-requested:{letter['job_id']}:1"
        job = await deployment.job(letter["job_id"])
        assert (job["state"], job["dead_reason"]) == ("dead", "request dead-lettered: delivery_limit")
        # An operator fixes the worker and retries: a new attempt is published.
        retried = await deployment.client.post(f"/api/jobs/{letter['job_id']}/retry")
        assert (retried.status_code, retried.json()["attempt"]) == (200, 2)


async def test_a_job_no_worker_finishes_is_requeued_then_dead(
    deploy: Callable[..., Any], rabbitmq_url: str
) -> None:
    study = f"2.25.{uuid.uuid4().int}"
    async with deploy(job_timeout_seconds=1, max_attempts=2, sweep_interval_seconds=0.2) as deployment:
        bus = deployment.resources.bus
        taken: list[events_pb2.InferenceRequested] = []

        async def silent_worker(envelope: Envelope) -> None:  # takes each job, then never answers
            request = codec.decode(envelope, events_pb2.InferenceRequested)
            taken.append(request)
            await bus.publish(started(request.job_id, request.attempt, at=datetime.now(UTC)))

        await bus.consume("inference.routine", silent_worker)
        await bus.publish(study_ready(study, chest_instances(study)))

        async def attempts_taken() -> bool:
            return len(taken) == 2

        await deployment.until(attempts_taken)
        job_id = taken[0].job_id
        assert [(r.job_id, r.attempt) for r in taken] == [(job_id, 1), (job_id, 2)]

        async def dead() -> bool:
            return (await deployment.job(job_id))["state"] == JobState.DEAD.value

        await deployment.until(dead)
        job = await deployment.job(job_id)
        assert (job["attempt"], job["dead_reason"]) == (2, "timed out after 2 attempts")
        states = [(entry["from"], entry["to"]) for entry in job["history"]]
        assert states == [
            (None, "queued"),
            ("queued", "running"),
            ("running", "queued"),
            ("queued", "running"),
            ("running", "dead"),
        ]
        await asyncio.sleep(1.5)
        assert len(taken) == 2  # no third attempt
