"""The contract of the orchestrator's job store, run against every adapter.

A test module imports these tests (``from tests.contract.job_store import *``) and defines the
fixtures ``job_store`` and ``other_job_store``: two started ``JobStore`` adapters on the same,
empty backing database (two orchestrator processes).
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

from lucerna.orchestrator.jobs import Job, JobState, Priority
from lucerna.orchestrator.store import DeadLetterRecord, JobStore
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot, instance_set_sha256

__all__ = [
    "test_a_job_is_created_once",
    "test_a_job_reads_back_as_written",
    "test_compare_and_set_refuses_a_stale_version",
    "test_concurrent_changes_of_one_job_have_one_winner",
    "test_dead_letters_are_recorded_once_and_listed_newest_first",
    "test_due_publications_are_the_pending_due_jobs_oldest_first",
    "test_instance_sets_are_kept_once_by_hash",
    "test_list_filters_orders_and_pages",
    "test_overdue_jobs_are_running_jobs_past_their_deadline",
    "test_ping",
    "test_the_study_snapshot_of_the_latest_burst_is_kept",
]

T0 = datetime(2026, 3, 1, 8, 0, 0, 123456, tzinfo=UTC)


def instances(count: int = 2, prefix: str = "1.2.3") -> tuple[InstanceRef, ...]:
    return tuple(
        InstanceRef(f"{prefix}.{n}", f"{prefix}.100", "1.2.840.10008.5.1.4.1.1.2", f"{n:064x}", "CT", "CHEST")
        for n in range(1, count + 1)
    )


def job(
    study: str = "1.2.3", model: str = "lung-nodule-detector", at: datetime = T0, **changes: object
) -> Job:
    refs = instances(prefix=study)
    made = Job.new(
        study_uid=study,
        model=model,
        model_version="1",
        priority=Priority.ROUTINE,
        instance_set_sha256=instance_set_sha256(refs),
        instance_count=len(refs),
        max_attempts=3,
        timeout_seconds=300,
        at=at,
        reason="rule chest matched burst 1",
    )
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


async def test_ping(job_store: JobStore) -> None:
    assert await job_store.ping() is True


async def test_a_job_is_created_once(job_store: JobStore, other_job_store: JobStore) -> None:
    first = job()
    stored, created = await job_store.create_job(first)
    assert created and stored == first and stored.version == 0
    again, created_again = await other_job_store.create_job(
        dataclasses.replace(first, priority=Priority.STAT)
    )
    assert not created_again
    assert again == first  # the stored job, not the second caller's
    racers = await asyncio.gather(*(s.create_job(job(study="7.7")) for s in [job_store, other_job_store] * 4))
    assert sum(created for _, created in racers) == 1


async def test_a_job_reads_back_as_written(job_store: JobStore) -> None:
    assert await job_store.get_job("0" * 32) is None
    made, _ = await job_store.create_job(job())
    running = made.started(1, "worker-a", T0 + timedelta(seconds=3))
    stored = await job_store.update_job(running)
    assert stored is not None
    done = stored.completed(1, "result-1", "ab" * 32, T0 + timedelta(seconds=9))
    final = await job_store.update_job(done)
    assert final is not None and final.version == 2
    read = await job_store.get_job(made.job_id)
    assert read == final
    assert read.state is JobState.SUCCEEDED and read.started_at == T0 + timedelta(seconds=3)
    assert [(t.from_state, t.to_state) for t in read.history] == [
        (None, JobState.QUEUED),
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.RUNNING, JobState.SUCCEEDED),
    ]


async def test_compare_and_set_refuses_a_stale_version(
    job_store: JobStore, other_job_store: JobStore
) -> None:
    made, _ = await job_store.create_job(job())
    cancelled = await job_store.update_job(made.cancelled(T0, "op"))
    assert cancelled is not None and cancelled.version == 1
    # A writer that read version 0 loses, whichever process it is.
    assert await other_job_store.update_job(made.started(1, "w", T0)) is None
    assert await job_store.update_job(made.started(1, "w", T0)) is None
    read = await other_job_store.get_job(made.job_id)
    assert read is not None and read.state is JobState.CANCELLED and read.version == 1


async def test_concurrent_changes_of_one_job_have_one_winner(
    job_store: JobStore, other_job_store: JobStore
) -> None:
    made, _ = await job_store.create_job(job())
    current = made
    for round_ in range(5):
        at = T0 + timedelta(seconds=round_)
        contenders = [current.note(at=at, reason=f"writer {n} of round {round_}") for n in range(6)]
        stores = [job_store, other_job_store] * 3
        results = await asyncio.gather(*(s.update_job(c) for s, c in zip(stores, contenders, strict=True)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, f"round {round_}: {len(winners)} writers won"
        read = await job_store.get_job(made.job_id)
        assert read == winners[0] and read.version == round_ + 1
        current = read


async def test_list_filters_orders_and_pages(job_store: JobStore) -> None:
    made = [
        job(study="1.1", model="lung-nodule-detector", at=T0),
        job(study="1.1", model="head-ct-hemorrhage", at=T0 + timedelta(seconds=1)),
        job(study="2.2", model="lung-nodule-detector", at=T0 + timedelta(seconds=2)),
    ]
    for item in made:
        await job_store.create_job(item)
    newest_first = [j.job_id for j in reversed(made)]
    assert [j.job_id for j in await job_store.list_jobs()] == newest_first
    assert [j.job_id for j in await job_store.list_jobs(limit=2, offset=1)] == newest_first[1:]
    assert [j.study_uid for j in await job_store.list_jobs(study_uid="1.1")] == ["1.1", "1.1"]
    by_model = await job_store.list_jobs(model="lung-nodule-detector")
    assert [j.study_uid for j in by_model] == ["2.2", "1.1"]
    stored = await job_store.get_job(made[0].job_id)
    assert stored is not None
    await job_store.update_job(stored.cancelled(T0, "op"))
    assert [j.job_id for j in await job_store.list_jobs(state=JobState.CANCELLED)] == [made[0].job_id]
    queued = await job_store.list_jobs(state=JobState.QUEUED, model="lung-nodule-detector", study_uid="2.2")
    assert [j.job_id for j in queued] == [made[2].job_id]
    assert await job_store.list_jobs(study_uid="9.9") == []


async def test_due_publications_are_the_pending_due_jobs_oldest_first(job_store: JobStore) -> None:
    late = job(study="1.1", at=T0 + timedelta(seconds=5))
    early = job(study="2.2", at=T0)
    future = job(study="3.3", at=T0, publish_after=T0 + timedelta(minutes=5))
    published = job(study="4.4", at=T0, publish_pending=False)
    for item in (late, early, future, published):
        await job_store.create_job(item)
    now = T0 + timedelta(seconds=10)
    assert [j.job_id for j in await job_store.due_publications(now)] == [early.job_id, late.job_id]
    assert [j.job_id for j in await job_store.due_publications(now, limit=1)] == [early.job_id]
    later = T0 + timedelta(minutes=6)
    assert future.job_id in [j.job_id for j in await job_store.due_publications(later)]
    stored = await job_store.get_job(early.job_id)
    assert stored is not None
    await job_store.update_job(stored.published(1, now))
    assert [j.job_id for j in await job_store.due_publications(now)] == [late.job_id]


async def test_overdue_jobs_are_running_jobs_past_their_deadline(job_store: JobStore) -> None:
    one, _ = await job_store.create_job(job(study="1.1"))
    two, _ = await job_store.create_job(job(study="2.2"))
    await job_store.create_job(job(study="3.3"))  # queued: never overdue
    await job_store.update_job(one.started(1, "w", T0))  # deadline T0 + 300 s
    await job_store.update_job(two.started(1, "w", T0 + timedelta(seconds=60)))  # deadline T0 + 360 s
    assert await job_store.overdue_jobs(T0 + timedelta(seconds=299)) == []
    assert [j.job_id for j in await job_store.overdue_jobs(T0 + timedelta(seconds=300))] == [one.job_id]
    both = await job_store.overdue_jobs(T0 + timedelta(hours=1))
    assert [j.job_id for j in both] == [one.job_id, two.job_id]


async def test_instance_sets_are_kept_once_by_hash(job_store: JobStore, other_job_store: JobStore) -> None:
    refs = instances(3)
    sha = instance_set_sha256(refs)
    assert await job_store.get_instance_set(sha) is None
    await asyncio.gather(job_store.put_instance_set(sha, refs), other_job_store.put_instance_set(sha, refs))
    await job_store.put_instance_set(sha, refs)
    assert await other_job_store.get_instance_set(sha) == refs


async def test_the_study_snapshot_of_the_latest_burst_is_kept(job_store: JobStore) -> None:
    def snapshot(burst: int, count: int) -> StudySnapshot:
        return StudySnapshot(
            study_uid="1.2.3",
            burst=burst,
            ready_at=T0 + timedelta(minutes=burst),
            study_description="CT CHEST",
            modalities=("CT",),
            body_parts=("CHEST",),
            sop_class_uids=("1.2.840.10008.5.1.4.1.1.2",),
            calling_ae_titles=("CT1",),
            instances=instances(count),
        )

    assert await job_store.get_study("1.2.3") is None
    await job_store.put_study(snapshot(2, 4))
    assert await job_store.get_study("1.2.3") == snapshot(2, 4)
    await job_store.put_study(snapshot(1, 2))  # an older burst delivered late changes nothing
    assert await job_store.get_study("1.2.3") == snapshot(2, 4)
    await job_store.put_study(snapshot(3, 5))
    assert await job_store.get_study("1.2.3") == snapshot(3, 5)


async def test_dead_letters_are_recorded_once_and_listed_newest_first(job_store: JobStore) -> None:
    def record(n: int) -> DeadLetterRecord:
        return DeadLetterRecord(
            record_id=f"inference.stat:m{n}",
            queue="inference.stat",
            message_id=f"m{n}",
            routing_key="inference.requested.stat.head-ct-hemorrhage",
            type="lucerna.events.v1.InferenceRequested",
            reason="delivery_limit",
            dead_at=T0 + timedelta(seconds=n),
            recorded_at=T0 + timedelta(seconds=n, milliseconds=5),
            correlation_id=f"job{n}",
            job_id=f"job{n}",
            attempt=1,
        )

    assert await job_store.add_dead_letter(record(1)) is True
    assert await job_store.add_dead_letter(record(2)) is True
    assert await job_store.add_dead_letter(record(1)) is False
    assert await job_store.list_dead_letters() == [record(2), record(1)]
    assert await job_store.list_dead_letters(limit=1, offset=1) == [record(1)]
