"""Study assembly as a consumer sees it: one StudyReady per burst on the real RabbitMQ queue."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aio_pika
from pydicom.uid import generate_uid

from lucerna.core.events.topology import queue
from lucerna.events.v1 import events_pb2
from tests.e2e.platform import LucernaProcess
from tests.factories import ct_slice

QUEUE = queue("orchestrator.study-ready").name
# This test is the orchestrator's queue's consumer: the platform runs without the orchestrator.
PLATFORM_SERVICES = ["ingestion", "metadata"]


def storescu(platform: LucernaProcess, folder: Path) -> None:
    """Send every file of a folder in one association."""
    result = subprocess.run(
        ["storescu", "-aec", platform.ae_title, "127.0.0.1", str(platform.dimse_port), "+sd", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def study_ready_events(url: str, study_uid: str, seconds: float) -> list[events_pb2.StudyReady]:
    """The StudyReady events of one study that arrive within ``seconds`` (others are left queued)."""
    found: list[events_pb2.StudyReady] = []
    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel()
        source = await channel.get_queue(QUEUE, ensure=False)
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            message = await source.get(no_ack=False, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            event = events_pb2.StudyReady.FromString(message.body)
            if event.study_instance_uid == study_uid:
                assert message.message_id == f"study-ready:{study_uid}:{event.burst}"
                assert message.correlation_id == study_uid
                found.append(event)
                await message.ack()
            else:
                await message.nack(requeue=True)
    finally:
        await connection.close()
    return found


def write_slices(folder: Path, study_uid: str, series_uid: str, numbers: range) -> None:
    folder.mkdir(parents=True)
    for number in numbers:
        ct_slice(study_uid, series_uid, number).save_as(folder / f"{number}.dcm", enforce_file_format=True)


async def test_one_study_ready_per_burst(servers_platform: LucernaProcess, tmp_path: Path) -> None:
    rabbitmq_url = servers_platform.rabbitmq_url
    assert rabbitmq_url is not None
    study_uid, series_uid = generate_uid(), generate_uid()
    write_slices(tmp_path / "first", study_uid, series_uid, range(1, 4))
    write_slices(tmp_path / "second", study_uid, series_uid, range(4, 6))

    await asyncio.to_thread(storescu, servers_platform, tmp_path / "first")
    first = await study_ready_events(rabbitmq_url, study_uid, seconds=6)
    assert [(e.burst_instances, e.total_instances, list(e.modalities)) for e in first] == [(3, 3, ["CT"])]
    assert first[0].sources and first[0].sources[0].startswith("dimse:")

    await asyncio.to_thread(storescu, servers_platform, tmp_path / "second")
    second = await study_ready_events(rabbitmq_url, study_uid, seconds=6)
    assert [(e.burst_instances, e.total_instances) for e in second] == [(2, 5)]
    assert second[0].burst == first[0].burst + 1
