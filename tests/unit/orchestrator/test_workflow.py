"""The orchestrator over the embedded adapters: study.ready → jobs → inference requests → job events,
timeouts, dead letters, an unreliable bus and a restart."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.events.ports import Envelope, PublishError
from lucerna.events.v1 import events_pb2
from lucerna.orchestrator.errors import ConfigurationError
from lucerna.orchestrator.jobs import JobState, job_id_of
from lucerna.orchestrator.service import OrchestratorService
from lucerna.orchestrator.studies import InstanceRef, instance_set_sha256
from lucerna.orchestrator.workflow import OUTBOX_GRACE
from tests.unit.orchestrator.kit import (
    Orchestra,
    chest_instances,
    completed,
    embedded_resources,
    failed,
    head_instances,
    orchestrator_settings,
    running,
    started,
    study_ready,
)


@pytest.fixture
async def orchestra(tmp_path: Path) -> AsyncIterator[Orchestra]:
    async with running(embedded_resources(tmp_path), orchestrator_settings(tmp_path)) as started_orchestra:
        yield started_orchestra


def set_of(instances: list[events_pb2.InstanceRef]) -> str:
    return instance_set_sha256(InstanceRef(i.sop_instance_uid, "", "", i.sha256) for i in instances)


async def test_a_ready_study_gets_one_job_and_one_request_per_matching_model(orchestra: Orchestra) -> None:
    chest, head = chest_instances("1.1"), head_instances("1.1")
    await orchestra.publish(study_ready("1.1", [*chest, *head], description="CT TRAUMA"))
    await orchestra.until(lambda: len(orchestra.requests) == 2)
    by_model = {r.model: (r, e) for r, e in zip(orchestra.requested(), orchestra.requests, strict=True)}
    stat, stat_envelope = by_model["head-ct-hemorrhage"]
    routine, routine_envelope = by_model["lung-nodule-detector"]
    assert stat.priority == events_pb2.STAT and routine.priority == events_pb2.ROUTINE
    assert stat_envelope.routing_key == "inference.requested.stat.head-ct-hemorrhage"
    assert routine_envelope.routing_key == "inference.requested.routine.lung-nodule-detector"
    # Each model gets the instances its rules admit: the chest series, the head series.
    assert [i.sop_instance_uid for i in routine.instances] == [i.sop_instance_uid for i in chest]
    assert [i.sop_instance_uid for i in stat.instances] == [i.sop_instance_uid for i in head]
    assert routine.instances[0] == chest[0]
    assert routine.instance_set_sha256 == set_of(chest)
    assert routine.job_id == job_id_of("1.1", "lung-nodule-detector", "1", set_of(chest))
    assert (routine.model_version, stat.model_version) == ("1", "2")
    assert (routine.attempt, routine.timeout_seconds, routine.study_instance_uid) == (1, 60, "1.1")
    assert routine_envelope.message_id == f"inference-requested:{routine.job_id}:1"
    assert routine_envelope.correlation_id == routine.job_id
    # The outbox flag is cleared just after the request is published: wait for it, not for timing.
    await orchestra.until(lambda: _published(orchestra, routine.job_id))
    job = await orchestra.job(routine.job_id)
    assert (job.state, job.publish_pending, job.instance_count) == (JobState.QUEUED, False, 3)
    assert job.requested_at is not None


async def test_a_repeated_study_ready_creates_nothing_new(orchestra: Orchestra) -> None:
    chest = chest_instances("2.2")
    event = study_ready("2.2", chest)
    await orchestra.publish(event)
    await orchestra.until(lambda: len(orchestra.requests) == 1)
    await orchestra.publish(event)  # redelivered
    await orchestra.publish(study_ready("2.2", list(reversed(chest)), burst=2))  # same instances, new burst
    await orchestra.until(lambda: orchestra.resources.bus.pending("orchestrator.study-ready") == 0)
    await orchestra.workflow.sweep()
    assert len(orchestra.requests) == 1
    assert len(await orchestra.workflow.store.list_jobs(study_uid="2.2")) == 1
    # More instances make another instance set: another job.
    await orchestra.publish(study_ready("2.2", chest_instances("2.2", 5), burst=3))
    await orchestra.until(lambda: len(orchestra.requests) == 2)
    assert len(await orchestra.workflow.store.list_jobs(study_uid="2.2")) == 2


async def test_a_study_no_rule_matches_gets_no_job(orchestra: Orchestra) -> None:
    mr = [dataclasses_replace(i, modality="MR") for i in chest_instances("3.3")]
    await orchestra.publish(study_ready("3.3", mr, description="MR KNEE"))
    await orchestra.until(lambda: orchestra.resources.bus.pending("orchestrator.study-ready") == 0)
    await orchestra.until(lambda: orchestra.workflow.store.get_study("3.3"))
    assert await orchestra.workflow.store.list_jobs(study_uid="3.3") == []
    assert orchestra.requests == []


def dataclasses_replace(instance: events_pb2.InstanceRef, **changes: str) -> events_pb2.InstanceRef:
    copy = events_pb2.InstanceRef()
    copy.CopyFrom(instance)
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


async def request_one(orchestra: Orchestra, study: str = "4.4") -> str:
    await orchestra.publish(study_ready(study, chest_instances(study)))
    await orchestra.until(lambda: orchestra.requests)
    return orchestra.requested()[-1].job_id


async def test_worker_reports_move_the_job_to_its_result(orchestra: Orchestra) -> None:
    job_id = await request_one(orchestra)
    await orchestra.publish(started(job_id, worker="gpu-node-1"))
    running_job = await orchestra.job_in(job_id, JobState.RUNNING)
    assert running_job.worker == "gpu-node-1" and running_job.deadline is not None
    await orchestra.publish(completed(job_id, result_id="r-42"))
    done = await orchestra.job_in(job_id, JobState.SUCCEEDED)
    assert (done.result_id, done.weights_sha256) == ("r-42", "ab" * 32)
    await orchestra.publish(completed(job_id, result_id="r-42"))  # redelivered: a no-op
    await orchestra.publish(started(job_id))  # late: a no-op
    await orchestra.until(lambda: orchestra.resources.bus.pending("orchestrator.job-events") == 0)
    assert (await orchestra.job(job_id)).version == done.version


async def test_a_permanent_failure_fails_the_job_with_its_reason(orchestra: Orchestra) -> None:
    job_id = await request_one(orchestra)
    await orchestra.publish(failed(job_id, reason="JPEG 2000 stream is truncated"))
    job = await orchestra.job_in(job_id, JobState.FAILED)
    assert job.last_error == "JPEG 2000 stream is truncated"


async def test_events_for_unknown_jobs_or_of_unknown_types_are_dead_lettered(orchestra: Orchestra) -> None:
    bus = orchestra.resources.bus
    assert isinstance(bus, InProcessBus)
    await orchestra.publish(started("0" * 32))
    await orchestra.until(lambda: bus.dead_letters("orchestrator.job-events"))
    [dead] = bus.dead_letters("orchestrator.job-events")
    assert dead.reason == f"permanent: no job {'0' * 32}"


async def test_a_running_job_past_its_deadline_is_requeued_then_dead(orchestra: Orchestra) -> None:
    job_id = await request_one(orchestra)
    start = datetime.now(UTC)
    for attempt in (1, 2, 3):
        await orchestra.publish(started(job_id, attempt=attempt, at=start))
        await orchestra.job_in(job_id, JobState.RUNNING)
        assert (await orchestra.workflow.sweep(start + timedelta(seconds=59))).requeued == 0
        swept = await orchestra.workflow.sweep(start + timedelta(seconds=60))
        if attempt < 3:
            assert (swept.requeued, swept.published) == (1, 1)
            await orchestra.until(lambda attempt=attempt: len(orchestra.requests) == attempt + 1)
            request = orchestra.requested()[-1]
            assert (request.job_id, request.attempt) == (job_id, attempt + 1)
            assert orchestra.requests[-1].message_id == f"inference-requested:{job_id}:{attempt + 1}"
        else:
            assert swept.dead == 1
    job = await orchestra.job(job_id)
    assert (job.state, job.attempt, job.dead_reason) == (JobState.DEAD, 3, "timed out after 3 attempts")
    assert [t.to_state for t in job.history].count(JobState.QUEUED) == 3


async def test_a_poison_request_is_dead_lettered_and_kills_its_job(orchestra: Orchestra) -> None:
    chest = chest_instances("5.5")
    job_id = job_id_of("5.5", "lung-nodule-detector", "1", set_of(chest))
    orchestra.poison.add(job_id)
    await orchestra.publish(study_ready("5.5", chest))
    job = await orchestra.job_in(job_id, JobState.DEAD)
    assert job.dead_reason == f"request dead-lettered: permanent: cannot decode the pixels of job {job_id}"
    [record] = await orchestra.workflow.store.list_dead_letters()
    assert (record.queue, record.job_id, record.attempt) == ("inference.routine", job_id, 1)
    assert record.message_id == f"inference-requested:{job_id}:1"
    assert record.routing_key == "inference.requested.routine.lung-nodule-detector"
    assert record.type == "lucerna.events.v1.InferenceRequested"


async def test_a_garbage_dead_letter_is_recorded_without_a_job(orchestra: Orchestra) -> None:
    garbage = Envelope(
        routing_key="inference.requested.stat.head-ct-hemorrhage",
        body=b"\xff\x00garbage",
        message_id="",
        correlation_id="",
        timestamp=datetime.now(UTC),
        type="lucerna.events.v1.InferenceRequested",
    )
    await orchestra.publish(garbage)  # the worker cannot parse it: dead at once
    await orchestra.until(orchestra.workflow.store.list_dead_letters)
    [record] = await orchestra.workflow.store.list_dead_letters()
    assert record.queue == "inference.stat" and record.job_id == "" and record.message_id == ""
    assert record.record_id.startswith("inference.stat:sha256-")


class RefusingBus:
    """The in-process bus, refusing inference requests while ``down``."""

    def __init__(self, bus: InProcessBus) -> None:
        self.bus = bus
        self.down = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bus, name)

    async def publish(self, envelope: Envelope) -> None:
        if self.down and envelope.routing_key.startswith("inference.requested"):
            raise PublishError("no confirm in time")
        await self.bus.publish(envelope)


async def test_requests_the_bus_refused_are_published_by_the_sweep(tmp_path: Path) -> None:
    resources = embedded_resources(tmp_path)
    assert isinstance(resources.bus, InProcessBus)
    refusing = RefusingBus(resources.bus)
    resources = dataclasses.replace(resources, bus=refusing)  # type: ignore[arg-type]
    async with running(resources, orchestrator_settings(tmp_path)) as orchestra:
        await orchestra.publish(study_ready("6.6", chest_instances("6.6")))
        await orchestra.until(lambda: orchestra.workflow.store.list_jobs(study_uid="6.6"))
        [job] = await orchestra.workflow.store.list_jobs(study_uid="6.6")
        assert job.publish_pending
        later = datetime.now(UTC) + OUTBOX_GRACE  # the outbox leaves a new job to its creator this long
        assert (await orchestra.workflow.sweep(later)).published == 0  # still down: kept
        refusing.down = False
        assert (await orchestra.workflow.sweep(later)).published == 1
        await orchestra.until(lambda: len(orchestra.requests) == 1)
        assert not (await orchestra.job(job.job_id)).publish_pending
        assert (await orchestra.workflow.sweep(later)).published == 0


async def test_open_jobs_are_requested_again_after_a_restart_of_the_in_process_bus(tmp_path: Path) -> None:
    settings = orchestrator_settings(tmp_path)
    async with running(embedded_resources(tmp_path), settings) as first:
        await first.publish(study_ready("7.7", [*chest_instances("7.7"), *head_instances("7.7")]))
        await first.until(lambda: len(first.requests) == 2)
        running_id, queued_id = (r.job_id for r in first.requested())
        await first.publish(started(running_id))
        await first.job_in(running_id, JobState.RUNNING)
    # The process restarts: the in-process bus lost both requests.
    async with running(embedded_resources(tmp_path), settings) as second:
        await second.until(lambda: len(second.requests) == 2)
        assert sorted((r.job_id, r.attempt) for r in second.requested()) == sorted(
            [(running_id, 1), (queued_id, 1)]
        )
        requeued = await second.job(running_id)
        assert requeued.state is JobState.QUEUED and requeued.history[-1].reason.startswith(
            "the in-process bus"
        )


async def test_start_fails_fast_on_rules_naming_a_missing_model(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - {name: x, match: {modalities: [CT]}, models: [spleen-seg], priority: stat}\n"
    )
    service = OrchestratorService(orchestrator_settings(tmp_path, rules_file=rules))
    with pytest.raises(ConfigurationError, match=r"rules\.yaml: rules\[0\] \(x\): models: 'spleen-seg'"):
        await service.start(embedded_resources(tmp_path))


async def test_start_fails_fast_without_a_model_repository(tmp_path: Path) -> None:
    service = OrchestratorService(orchestrator_settings(tmp_path, model_repository=tmp_path / "none"))
    with pytest.raises(ConfigurationError, match=r"LUCERNA_ORCHESTRATOR_MODEL_REPOSITORY.*not a folder"):
        await service.start(embedded_resources(tmp_path))


async def _published(orchestra: Orchestra, job_id: str) -> bool:
    return not (await orchestra.job(job_id)).publish_pending
