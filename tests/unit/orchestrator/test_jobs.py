"""The job state machine: allowed transitions only, late and repeated events change nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from datetime import UTC, datetime, timedelta

import pytest

from lucerna.orchestrator.errors import IllegalTransitionError
from lucerna.orchestrator.jobs import TRANSITIONS, Job, JobState, Priority, job_id_of
from lucerna.orchestrator.studies import InstanceRef, instance_set_sha256

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
BACKOFF = timedelta(seconds=5)


def new_job(max_attempts: int = 3) -> Job:
    return Job.new(
        study_uid="1.2.3",
        model="lung-nodule-detector",
        model_version="1",
        priority=Priority.ROUTINE,
        instance_set_sha256="f" * 64,
        instance_count=3,
        max_attempts=max_attempts,
        timeout_seconds=60,
        at=T0,
        reason="rule chest matched burst 1",
    )


def in_state(state: JobState) -> Job:
    return dataclasses.replace(new_job(), state=state)


def test_job_ids_and_instance_set_hashes_follow_the_contract() -> None:
    refs = [InstanceRef("1.2.3.2", "1.9", "c", "bb" * 32), InstanceRef("1.2.3.1", "1.9", "c", "aa" * 32)]
    lines = f"1.2.3.1:{'aa' * 32}\n1.2.3.2:{'bb' * 32}\n"
    assert instance_set_sha256(refs) == hashlib.sha256(lines.encode()).hexdigest()
    assert instance_set_sha256(reversed(refs)) == instance_set_sha256(refs)  # order does not matter
    assert instance_set_sha256([*refs, refs[0]]) == instance_set_sha256(refs)  # nor a repeated instance
    key = f"1.2.3\nlung-nodule-detector\n1\n{'f' * 64}"
    assert (
        job_id_of("1.2.3", "lung-nodule-detector", "1", "f" * 64)
        == hashlib.sha256(key.encode()).hexdigest()[:32]
    )
    assert new_job().job_id == job_id_of("1.2.3", "lung-nodule-detector", "1", "f" * 64)
    assert job_id_of("1.2.3", "lung-nodule-detector", "2", "f" * 64) != new_job().job_id


@pytest.mark.parametrize(
    ("from_state", "to_state"),
    [(a, b) for a, b in itertools.product(JobState, JobState) if b not in TRANSITIONS[a]],
)
def test_every_transition_outside_the_table_is_refused(from_state: JobState, to_state: JobState) -> None:
    job = in_state(from_state)
    with pytest.raises(
        IllegalTransitionError, match=f"is {from_state.value}; it cannot become {to_state.value}"
    ):
        job.move(to_state, at=T0, reason="test")


def test_a_succeeded_job_is_final() -> None:
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()


def test_the_happy_path_records_every_step() -> None:
    job = new_job()
    assert (job.state, job.attempt, job.publish_pending, job.publish_after) == (JobState.QUEUED, 1, True, T0)
    job = job.published(1, T0 + timedelta(seconds=1))
    assert not job.publish_pending and job.requested_at == T0 + timedelta(seconds=1)
    job = job.started(1, "w1", T0 + timedelta(seconds=2))
    assert job.state is JobState.RUNNING and job.deadline == T0 + timedelta(seconds=62)
    job = job.completed(1, "r1", "ab" * 32, T0 + timedelta(seconds=12))
    assert job.state is JobState.SUCCEEDED
    assert (job.result_id, job.finished_at, job.deadline) == ("r1", T0 + timedelta(seconds=12), None)
    assert (job.wait_seconds, job.run_seconds, job.total_seconds) == (2.0, 10.0, 12.0)
    assert [(t.from_state, t.to_state, t.attempt) for t in job.history] == [
        (None, JobState.QUEUED, 1),
        (JobState.QUEUED, JobState.RUNNING, 1),
        (JobState.RUNNING, JobState.SUCCEEDED, 1),
    ]


def test_repeated_and_stale_reports_change_nothing() -> None:
    running = new_job().started(1, "w1", T0)
    assert running.started(1, "w1", T0 + timedelta(seconds=1)) is running  # redelivered
    assert running.failed(2, "x", T0) is running  # an attempt that does not exist
    done = running.completed(1, "r1", "ab" * 32, T0)
    assert done.completed(1, "r1", "ab" * 32, T0) is done
    assert done.failed(1, "late failure", T0) is done
    assert done.started(1, "w2", T0) is done
    retried = running.timed_out(T0 + timedelta(seconds=60), BACKOFF)
    assert retried.attempt == 2
    assert retried.started(1, "w-old", T0) is retried  # attempt 1's late start
    assert retried.failed(1, "attempt 1 failed late", T0) is retried


def test_a_result_overtaking_its_start_still_counts() -> None:
    job = new_job().completed(1, "r1", "ab" * 32, T0)
    assert job.state is JobState.SUCCEEDED


def test_timeouts_requeue_with_backoff_then_kill() -> None:
    job = new_job(max_attempts=2).started(1, "w1", T0)
    assert not job.overdue(T0 + timedelta(seconds=59))
    assert job.timed_out(T0 + timedelta(seconds=59), BACKOFF) is job
    now = T0 + timedelta(seconds=60)
    second = job.timed_out(now, BACKOFF)
    assert (second.state, second.attempt, second.publish_pending) == (JobState.QUEUED, 2, True)
    assert second.publish_after == now + BACKOFF and second.started_at is None and second.worker == ""
    assert second.last_error == "attempt 1 timed out after 60 s"
    running = second.started(2, "w2", now + timedelta(seconds=10))
    dead = running.timed_out(now + timedelta(seconds=70), BACKOFF)
    assert (dead.state, dead.dead_reason) == (JobState.DEAD, "timed out after 2 attempts")
    # A late result of attempt 1 (same key, same inputs) revives the job.
    revived = dead.completed(1, "r1", "ab" * 32, now + timedelta(seconds=80))
    assert revived.state is JobState.SUCCEEDED


def test_a_permanent_failure_and_an_operator_retry() -> None:
    failed = new_job().started(1, "w1", T0).failed(1, "undecodable pixels", T0 + timedelta(seconds=1))
    assert (failed.state, failed.last_error) == (JobState.FAILED, "undecodable pixels")
    again = failed.retried(T0 + timedelta(minutes=1), "ops@example.org")
    assert (again.state, again.attempt, again.publish_pending, again.finished_at) == (
        JobState.QUEUED,
        2,
        True,
        None,
    )
    assert again.history[-1].reason == "retried by ops@example.org"
    with pytest.raises(IllegalTransitionError):
        again.retried(T0, "ops")
    with pytest.raises(IllegalTransitionError):
        again.completed(2, "r", "ab" * 32, T0).retried(T0, "ops")


def test_cancel_only_open_jobs_and_keep_a_late_result_in_the_history() -> None:
    cancelled = new_job().started(1, "w1", T0).cancelled(T0 + timedelta(seconds=1), "ops")
    assert (cancelled.state, cancelled.publish_pending) == (JobState.CANCELLED, False)
    with pytest.raises(IllegalTransitionError, match="is cancelled; it cannot become cancelled"):
        cancelled.cancelled(T0, "ops")
    late = cancelled.completed(1, "r1", "ab" * 32, T0 + timedelta(seconds=5))
    assert late.state is JobState.CANCELLED and late.result_id == "r1"
    assert late.history[-1].reason == "result r1 of attempt 1 came after the cancellation"
    assert late.completed(1, "r1", "ab" * 32, T0 + timedelta(seconds=6)) is late
    assert late.failed(1, "x", T0) is late
    with pytest.raises(IllegalTransitionError, match="is succeeded; it cannot become cancelled"):
        new_job().completed(1, "r", "ab" * 32, T0).cancelled(T0, "ops")


def test_a_dead_lettered_request_kills_only_its_own_attempt() -> None:
    job = new_job()
    assert job.dead_lettered(2, "delivery_limit", T0) is job
    dead = job.dead_lettered(1, "delivery_limit", T0)
    assert (dead.state, dead.dead_reason) == (JobState.DEAD, "request dead-lettered: delivery_limit")
    assert dead.retried(T0, "ops").dead_reason == ""


def test_a_request_lost_in_a_restart_is_requested_again_in_the_same_attempt() -> None:
    queued = new_job().published(1, T0)
    again = queued.request_lost(T0 + timedelta(minutes=1))
    assert (again.state, again.attempt, again.publish_pending) == (JobState.QUEUED, 1, True)
    running = queued.started(1, "w1", T0)
    requeued = running.request_lost(T0 + timedelta(minutes=1))
    assert (requeued.state, requeued.attempt, requeued.deadline) == (JobState.QUEUED, 1, None)
    done = running.completed(1, "r", "ab" * 32, T0)
    assert done.request_lost(T0) is done
