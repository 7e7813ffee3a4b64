"""Jobs: one model run over one instance set of one study, and their state machine.

States::

    queued ──▶ running ──▶ succeeded
      │  ▲        │  └───▶ failed ───┐
      │  └────────┘ (timed out:      │ (operator retry)
      │           next attempt)      ▼
      ├──▶ dead (delivery failed,  queued
      │          attempts used up)   ▲
      └──▶ cancelled (operator) ─────┘

A job's id is derived from its key (study, model, model version, instance set), so the same study
announced twice yields the same job, never a second one. Every change goes through ``Job.move``,
which refuses a transition the table ``TRANSITIONS`` does not allow; events that arrive late or
twice (a redelivery, an older attempt's answer) leave the job as it is. A job is immutable: each
change returns a new ``Job`` with the same ``version``, which the store compares and increments.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from lucerna.orchestrator.errors import IllegalTransitionError


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"  # its request is (or is about to be) on the inference queue
    RUNNING = "running"  # a worker took it
    SUCCEEDED = "succeeded"  # the worker stored its result
    FAILED = "failed"  # the worker reported a permanent failure
    DEAD = "dead"  # its request was dead-lettered, or it timed out on every attempt
    CANCELLED = "cancelled"  # an operator cancelled it


class Priority(enum.StrEnum):
    """STAT work is drained before routine work (its own queue)."""

    STAT = "stat"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """Higher is more urgent."""
        return 1 if self is Priority.STAT else 0


ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # A result or a failure may overtake the worker's "started" event (one queue, several consumers).
    JobState.QUEUED: frozenset(
        {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED}
    ),
    # Back to queued: timed out (next attempt), or its in-process request was lost in a restart.
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED}
    ),
    # Operator retry; or the late result of an earlier attempt of the same key (the same inputs).
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SUCCEEDED}),
    JobState.DEAD: frozenset({JobState.QUEUED, JobState.SUCCEEDED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
}


def job_id_of(study_uid: str, model: str, model_version: str, instance_set_sha256: str) -> str:
    """The job id of a key: the first 32 hex digits of SHA-256 over its four parts, one per line."""
    key = f"{study_uid}\n{model}\n{model_version}\n{instance_set_sha256}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Transition:
    """One entry of a job's history; ``from_state == to_state`` records an event that changed nothing
    but is worth knowing (a result that came after a cancellation)."""

    at: datetime
    from_state: JobState | None  # None: the job was created
    to_state: JobState
    attempt: int
    reason: str


@dataclass(frozen=True)
class Job:
    """A job as stored. ``version`` counts the stored changes (compare-and-set in the store)."""

    job_id: str
    study_uid: str
    model: str
    model_version: str
    priority: Priority
    instance_set_sha256: str
    instance_count: int
    state: JobState
    attempt: int
    max_attempts: int
    timeout_seconds: int
    created_at: datetime
    history: tuple[Transition, ...]
    queued_at: datetime  # when the current attempt was queued
    requested_at: datetime | None = None  # when the bus took the current attempt's request
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None  # running: re-queued (or dead) past this
    worker: str = ""
    result_id: str = ""
    weights_sha256: str = ""
    last_error: str = ""
    dead_reason: str = ""
    # Outbox: the current attempt's request is still to be published, not before ``publish_after``.
    publish_pending: bool = True
    publish_after: datetime | None = None
    version: int = 0

    @classmethod
    def new(
        cls,
        *,
        study_uid: str,
        model: str,
        model_version: str,
        priority: Priority,
        instance_set_sha256: str,
        instance_count: int,
        max_attempts: int,
        timeout_seconds: int,
        at: datetime,
        reason: str,
    ) -> Job:
        """A queued job whose first request is due now."""
        return cls(
            job_id=job_id_of(study_uid, model, model_version, instance_set_sha256),
            study_uid=study_uid,
            model=model,
            model_version=model_version,
            priority=priority,
            instance_set_sha256=instance_set_sha256,
            instance_count=instance_count,
            state=JobState.QUEUED,
            attempt=1,
            max_attempts=max_attempts,
            timeout_seconds=timeout_seconds,
            created_at=at,
            history=(Transition(at, None, JobState.QUEUED, 1, reason),),
            queued_at=at,
            publish_after=at,
        )

    # --- the one checked primitive ------------------------------------------------------------

    def move(self, to: JobState, *, at: datetime, reason: str, **changes: object) -> Job:
        """This job in state ``to`` with ``changes``; ``IllegalTransitionError`` if not allowed."""
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransitionError(self.job_id, self.state, to)
        attempt = changes.get("attempt", self.attempt)
        assert isinstance(attempt, int)
        entry = Transition(at, self.state, to, attempt, reason)
        return dataclasses.replace(
            self,
            state=to,
            history=(*self.history, entry),
            **changes,  # type: ignore[arg-type]
        )

    def note(self, *, at: datetime, reason: str) -> Job:
        """This job with an event recorded in its history, its state unchanged."""
        entry = Transition(at, self.state, self.state, self.attempt, reason)
        return dataclasses.replace(self, history=(*self.history, entry))

    # --- what the worker reports --------------------------------------------------------------

    def started(self, attempt: int, worker: str, at: datetime) -> Job:
        """A worker took ``attempt``: running until ``at`` plus the timeout. Other attempts' and
        repeated reports change nothing."""
        if self.state is JobState.QUEUED and attempt == self.attempt:
            return self.move(
                JobState.RUNNING,
                at=at,
                reason=f"taken by worker {worker or '(unnamed)'}",
                started_at=at,
                deadline=at + timedelta(seconds=self.timeout_seconds),
                worker=worker,
                publish_pending=False,  # the request is evidently on the bus
            )
        return self

    def completed(self, attempt: int, result_id: str, weights_sha256: str, at: datetime) -> Job:
        """The worker stored a result. Any attempt's result counts (same key, same inputs); after a
        cancellation it is only recorded; a repeated report changes nothing."""
        if self.state is JobState.SUCCEEDED:
            return self
        if self.state is JobState.CANCELLED:
            if self.result_id == result_id:
                return self
            reason = f"result {result_id} of attempt {attempt} came after the cancellation"
            noted = self.note(at=at, reason=reason)
            return dataclasses.replace(noted, result_id=result_id, weights_sha256=weights_sha256)
        return self.move(
            JobState.SUCCEEDED,
            at=at,
            reason=f"result {result_id} stored by attempt {attempt}",
            finished_at=at,
            deadline=None,
            result_id=result_id,
            weights_sha256=weights_sha256,
            publish_pending=False,
        )

    def failed(self, attempt: int, reason: str, at: datetime) -> Job:
        """The worker gave up on ``attempt`` for good. Reports of other attempts change nothing."""
        if attempt != self.attempt or self.state not in ACTIVE:
            return self
        return self.move(
            JobState.FAILED,
            at=at,
            reason=f"failed: {reason}",
            finished_at=at,
            deadline=None,
            last_error=reason,
            publish_pending=False,
        )

    def dead_lettered(self, attempt: int, reason: str, at: datetime) -> Job:
        """The request of ``attempt`` was dead-lettered (the worker kept failing on it)."""
        if attempt != self.attempt or self.state not in ACTIVE:
            return self
        return self.move(
            JobState.DEAD,
            at=at,
            reason=f"request dead-lettered: {reason}",
            finished_at=at,
            deadline=None,
            dead_reason=f"request dead-lettered: {reason}",
            publish_pending=False,
        )

    # --- time ---------------------------------------------------------------------------------

    def overdue(self, now: datetime) -> bool:
        """Running past its deadline."""
        return self.state is JobState.RUNNING and self.deadline is not None and self.deadline <= now

    def timed_out(self, now: datetime, backoff: timedelta) -> Job:
        """An overdue job: its next attempt queued after ``backoff``, or dead once attempts are used up."""
        if not self.overdue(now):
            return self
        if self.attempt >= self.max_attempts:
            reason = f"timed out after {self.attempt} attempts"
            return self.move(
                JobState.DEAD,
                at=now,
                reason=reason,
                finished_at=now,
                deadline=None,
                dead_reason=reason,
                publish_pending=False,
            )
        return self.move(
            JobState.QUEUED,
            at=now,
            reason=f"attempt {self.attempt} timed out after {self.timeout_seconds} s",
            **self._next_attempt(now + backoff),
            last_error=f"attempt {self.attempt} timed out after {self.timeout_seconds} s",
        )

    def request_lost(self, at: datetime) -> Job:
        """Its request was on a bus that keeps nothing across a restart: publish it again (the same
        attempt; the loss is not the job's fault)."""
        if self.state is JobState.QUEUED:
            return dataclasses.replace(self, publish_pending=True, publish_after=at)
        if self.state is JobState.RUNNING:
            return self.move(
                JobState.QUEUED,
                at=at,
                reason="the in-process bus lost its request in a restart; requested again",
                queued_at=at,
                started_at=None,
                deadline=None,
                publish_pending=True,
                publish_after=at,
            )
        return self

    # --- the bus and operators ----------------------------------------------------------------

    def published(self, attempt: int, at: datetime) -> Job:
        """The bus took the request of ``attempt``."""
        if not self.publish_pending or attempt != self.attempt:
            return self
        return dataclasses.replace(self, publish_pending=False, requested_at=at)

    def retried(self, at: datetime, by: str) -> Job:
        """An operator asked for one more attempt of a failed, dead or cancelled job."""
        if self.state not in (JobState.FAILED, JobState.DEAD, JobState.CANCELLED):
            raise IllegalTransitionError(self.job_id, self.state, JobState.QUEUED)
        return self.move(
            JobState.QUEUED,
            at=at,
            reason=f"retried by {by}",
            **self._next_attempt(at),
            finished_at=None,
            dead_reason="",
        )

    def cancelled(self, at: datetime, by: str) -> Job:
        """An operator cancelled a queued or running job."""
        if self.state not in ACTIVE:
            raise IllegalTransitionError(self.job_id, self.state, JobState.CANCELLED)
        return self.move(
            JobState.CANCELLED,
            at=at,
            reason=f"cancelled by {by}",
            finished_at=at,
            deadline=None,
            publish_pending=False,
        )

    def _next_attempt(self, publish_after: datetime) -> dict[str, object]:
        return {
            "attempt": self.attempt + 1,
            "queued_at": publish_after,
            "requested_at": None,
            "started_at": None,
            "deadline": None,
            "worker": "",
            "publish_pending": True,
            "publish_after": publish_after,
        }

    # --- durations ----------------------------------------------------------------------------

    @property
    def wait_seconds(self) -> float | None:
        """Current attempt: queued to taken by a worker."""
        return _seconds(self.queued_at, self.started_at)

    @property
    def run_seconds(self) -> float | None:
        """Current attempt: taken by a worker to finished."""
        return _seconds(self.started_at, self.finished_at)

    @property
    def total_seconds(self) -> float | None:
        """Created to finished."""
        return _seconds(self.created_at, self.finished_at)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()
