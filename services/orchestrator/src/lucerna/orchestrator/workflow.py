"""The orchestrator's service layer: studies in, jobs and inference requests out, job events applied.

- ``on_study_ready``: keep the study's snapshot, match the workflow rules, create one job per model
  (the job id comes from the job's key, so a repeated ``study.ready`` creates nothing new) and
  publish the requests of the jobs not yet published.
- ``on_job_event``: apply a worker's ``inference.started|completed|failed`` to its job.
- ``on_dead_letter``: record a message dead-lettered from an inference queue and, when it is the
  current attempt's request, mark its job dead with the reason.
- ``sweep``: re-queue (or end) jobs running past their deadline, and publish the due requests of
  the job outbox: a job is stored with ``publish_pending`` before its request is published, and
  the flag is cleared only once the bus has taken it, so a crash or a bus outage loses none.
- ``request``, ``retry``, ``cancel``: what operators ask through the job API.

Every change of a job is read, decided by the state machine (``jobs``) and written by
compare-and-set; a lost race is decided again on the fresh job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from lucerna.core.events import codec
from lucerna.core.events.ports import DeadLetter, Envelope, MessageBus, PermanentError
from lucerna.events.v1 import events_pb2
from lucerna.orchestrator import events, metrics
from lucerna.orchestrator.errors import NotFoundError, UnprocessableError
from lucerna.orchestrator.jobs import Job, JobState, Priority
from lucerna.orchestrator.rules import RuleSet
from lucerna.orchestrator.store import DeadLetterRecord, JobStore
from lucerna.orchestrator.studies import InstanceRef, distinct, instance_set_sha256

log = logging.getLogger(__name__)

BATCH = 100
CHANGE_TRIES = 8  # compare-and-set rounds before giving up (the caller's retry takes over)
# A new job's request is published by the event that created it; the outbox (publish_due) takes
# over only if that has not happened within this grace, so the two do not publish it twice.
OUTBOX_GRACE = timedelta(seconds=5)
INFERENCE_QUEUES = ("inference.stat", "inference.routine")


class ConcurrentChangeError(RuntimeError):
    """A job kept changing under this writer; retrying later will do."""


@dataclass(frozen=True)
class Policy:
    """How long jobs may run and how often they are tried."""

    max_attempts: int
    timeout_seconds: int
    retry_backoff: timedelta
    retry_backoff_max: timedelta

    def backoff(self, attempt: int) -> timedelta:
        """The wait before the attempt after ``attempt``: base * 2**(attempt - 1), capped."""
        return min(self.retry_backoff_max, self.retry_backoff * (1 << min(max(attempt - 1, 0), 32)))


@dataclass(frozen=True)
class Swept:
    """What one sweep did."""

    requeued: int = 0
    dead: int = 0
    published: int = 0


def _now() -> datetime:
    return datetime.now(UTC)


class Workflow:
    """Rules, jobs and their events over a job store and a bus."""

    def __init__(
        self,
        store: JobStore,
        bus: MessageBus,
        rules: RuleSet,
        models: Mapping[str, str],
        *,
        policy: Policy,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self._bus = bus
        self._rules = rules
        self.models = dict(models)  # name -> version, from the model repository's manifests
        self._policy = policy
        self._clock = clock

    # --- events ---------------------------------------------------------------------------------

    async def on_study_ready(self, envelope: Envelope) -> list[Job]:
        """Create (once) and request the jobs the rules ask for; the study's jobs."""
        message = codec.decode(envelope, events_pb2.StudyReady)
        if not message.study_instance_uid:
            raise PermanentError("study.ready without a study_instance_uid")
        now = self._clock()
        study = events.snapshot(message, now)
        await self.store.put_study(study)
        planned = self._rules.plan(study)
        if not study.instances:
            log.warning(
                "study.ready carries no instances; no job can run on it",
                extra={"study_uid": study.study_uid, "burst": study.burst},
            )
        jobs = []
        for plan in planned:
            reason = f"rule {', '.join(plan.rules)} matched burst {study.burst}"
            job, created = await self._create(
                study.study_uid, plan.model, plan.priority, plan.instances, reason
            )
            jobs.append((job, created))
        log.info(
            "study ready",
            extra={
                "study_uid": study.study_uid,
                "burst": study.burst,
                "instances": len(study.instances),
                "jobs": {job.model: job.job_id for job, _ in jobs},
            },
        )
        # Only the event that created a job publishes its request: a repeated study.ready handled
        # meanwhile finds the job still in the outbox, which is the sweep's to publish (publish_due).
        return [await self._publish(job, self._clock()) if created else job for job, created in jobs]

    async def on_job_event(self, envelope: Envelope) -> Job:
        """Apply a worker's report to its job; the job as it is now."""
        change: Callable[[Job], Job]
        if envelope.type == events.INFERENCE_STARTED:
            started = codec.decode(envelope, events_pb2.InferenceStarted)
            job_id, at = started.job_id, events.time_of(started.started_at) or self._clock()
            change = lambda job: job.started(started.attempt, started.worker, at)  # noqa: E731
        elif envelope.type == events.INFERENCE_COMPLETED:
            completed = codec.decode(envelope, events_pb2.InferenceCompleted)
            job_id, at = completed.job_id, events.time_of(completed.completed_at) or self._clock()
            change = lambda job: job.completed(  # noqa: E731
                completed.attempt, completed.result_id, completed.weights_sha256, at
            )
        elif envelope.type == events.INFERENCE_FAILED:
            failed = codec.decode(envelope, events_pb2.InferenceFailed)
            job_id, at = failed.job_id, events.time_of(failed.failed_at) or self._clock()
            change = lambda job: job.failed(failed.attempt, failed.reason or "no reason given", at)  # noqa: E731
        else:
            raise PermanentError(f"not a job event: type {envelope.type!r}")
        if not job_id:
            raise PermanentError(f"{envelope.type} without a job_id")
        try:
            return await self._change(job_id, change)
        except NotFoundError as exc:
            raise PermanentError(str(exc)) from exc

    async def on_dead_letter(self, dead: DeadLetter) -> DeadLetterRecord:
        """Record a dead letter; mark the job of a dead-lettered current request dead."""
        job_id, attempt = "", 0
        if dead.envelope.type == events.INFERENCE_REQUESTED:
            try:
                request = codec.decode(dead.envelope, events_pb2.InferenceRequested)
            except PermanentError:
                pass  # recorded without a job: the message itself is garbage
            else:
                job_id, attempt = request.job_id, request.attempt
        message_id = dead.envelope.message_id or "sha256-" + hashlib.sha256(dead.envelope.body).hexdigest()
        record = DeadLetterRecord(
            record_id=f"{dead.queue}:{message_id}",
            queue=dead.queue,
            message_id=dead.envelope.message_id,
            routing_key=dead.envelope.routing_key,
            type=dead.envelope.type,
            reason=dead.reason,
            dead_at=dead.at,
            recorded_at=self._clock(),
            correlation_id=dead.envelope.correlation_id,
            job_id=job_id,
            attempt=attempt,
        )
        # The job first: once the dead letter is listed, its job shows it (a redelivery repeats both,
        # harmlessly: a dead job stays as it is and the record is kept once).
        if job_id:
            try:
                await self._change(job_id, lambda job: job.dead_lettered(attempt, dead.reason, dead.at))
            except NotFoundError:
                log.warning("a dead-lettered request names no known job", extra={"job_id": job_id})
        if await self.store.add_dead_letter(record):
            metrics.DEAD_LETTERS.labels(dead.queue).inc()
            log.error(
                "dead letter recorded",
                extra={"queue": dead.queue, "message_id": dead.envelope.message_id, "reason": dead.reason},
            )
        return record

    # --- time -----------------------------------------------------------------------------------

    async def sweep(self, now: datetime | None = None) -> Swept:
        """Time out overdue running jobs, then publish the due requests of the outbox."""
        now = now or self._clock()
        requeued = dead = 0
        while True:
            overdue = await self.store.overdue_jobs(now, BATCH)
            progressed = False
            for job in overdue:
                changed = await self._change(
                    job.job_id, lambda j: j.timed_out(now, self._policy.backoff(j.attempt)), first=job
                )
                progressed |= changed is not job
                requeued += changed.state is JobState.QUEUED and changed.attempt > job.attempt
                dead += changed.state is JobState.DEAD and job.state is not JobState.DEAD
            # A store keeping coarser times than the domain may list a job not yet overdue to it.
            if len(overdue) < BATCH or not progressed:
                break
        return Swept(requeued, dead, await self.publish_due(now))

    async def publish_due(self, now: datetime | None = None) -> int:
        """Publish the outbox's due requests, oldest first; stop at the first the bus refuses."""
        now = now or self._clock()
        published = 0
        while due := await self.store.due_publications(now, BATCH):
            for index, job in enumerate(due):
                after = await self._publish(job, now)
                if after.publish_pending and after.attempt == job.attempt:
                    metrics.PUBLICATIONS_PENDING.set(len(due) - index)
                    return published
                published += 1
            if len(due) < BATCH:
                break
        metrics.PUBLICATIONS_PENDING.set(0)
        return published

    async def recover_lost_requests(self) -> int:
        """Publish again the requests of every queued or running job (the in-process bus keeps
        nothing across a restart); how many jobs were affected."""
        now = self._clock()
        affected = []
        for state in (JobState.RUNNING, JobState.QUEUED):
            offset = 0
            while page := await self.store.list_jobs(state=state, limit=BATCH, offset=offset):
                affected += [job.job_id for job in page]
                offset += len(page)
        for job_id in affected:
            await self._change(job_id, lambda job: job.request_lost(now))
        return len(affected)

    # --- operators ------------------------------------------------------------------------------

    async def request(
        self, study_uid: str, models: Sequence[str], priority: Priority, by: str
    ) -> list[tuple[Job, bool]]:
        """Jobs of ``models`` over the study's last known instance set (created unless they exist,
        and requested); each with whether it was created."""
        unknown = sorted(set(models) - set(self.models))
        if unknown:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnprocessableError(
                f"unknown model(s) {', '.join(unknown)}; the model repository has: {known}"
            )
        study = await self.store.get_study(study_uid)
        if study is None:
            raise NotFoundError(f"study {study_uid} is unknown here: no study.ready for it has been received")
        if not study.instances:
            raise UnprocessableError(f"study {study_uid} has no instances to run a model on")
        results = []
        for model in dict.fromkeys(models):
            reason = f"requested by {by}"
            job, created = await self._create(study_uid, model, priority, study.instances, reason)
            results.append((await self._publish(job, self._clock()) if created else job, created))
        return results

    async def retry(self, job_id: str, by: str) -> Job:
        """One more attempt of a failed, dead or cancelled job, requested now."""
        job = await self._change(job_id, lambda j: j.retried(self._clock(), by))
        return await self._publish_if_due(job)

    async def cancel(self, job_id: str, by: str) -> Job:
        """Cancel a queued or running job."""
        return await self._change(job_id, lambda j: j.cancelled(self._clock(), by))

    async def get(self, job_id: str) -> Job:
        """The job; ``NotFoundError`` when unknown."""
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        return job

    # --- internals ------------------------------------------------------------------------------

    async def _create(
        self,
        study_uid: str,
        model: str,
        priority: Priority,
        instances: Sequence[InstanceRef],
        reason: str,
    ) -> tuple[Job, bool]:
        instances = distinct(instances)
        set_sha256 = instance_set_sha256(instances)
        await self.store.put_instance_set(set_sha256, instances)  # before the job that needs it
        job = Job.new(
            study_uid=study_uid,
            model=model,
            model_version=self.models[model],
            priority=priority,
            instance_set_sha256=set_sha256,
            instance_count=len(instances),
            max_attempts=self._policy.max_attempts,
            timeout_seconds=self._policy.timeout_seconds,
            at=self._clock(),
            reason=reason,
        )
        job = dataclasses.replace(job, publish_after=job.created_at + OUTBOX_GRACE)
        stored, created = await self.store.create_job(job)
        if created:
            metrics.JOBS_CREATED.labels(model, priority.value).inc()
            metrics.TRANSITIONS.labels("created", JobState.QUEUED.value).inc()
            log.info(
                "job created",
                extra={
                    "job_id": job.job_id,
                    "study_uid": study_uid,
                    "model": model,
                    "priority": priority.value,
                },
            )
        return stored, created

    async def _publish_if_due(self, job: Job) -> Job:
        now = self._clock()
        if job.publish_pending and (job.publish_after is None or job.publish_after <= now):
            return await self._publish(job, now)
        return job

    async def _publish(self, job: Job, now: datetime) -> Job:
        """Publish the job's current request and clear its outbox flag; the job as it is now. A bus
        that refuses leaves the flag set for the next sweep."""
        instances = await self.store.get_instance_set(job.instance_set_sha256)
        if instances is None:
            raise RuntimeError(f"instance set {job.instance_set_sha256} of job {job.job_id} is missing")
        try:
            await self._bus.publish(events.inference_requested(job, instances, now))
        except Exception as exc:  # noqa: BLE001 - any refusal leaves the request in the outbox
            metrics.PUBLISH_FAILURES.inc()
            log.warning(
                "inference request not published yet; it stays in the job outbox",
                extra={"job_id": job.job_id, "attempt": job.attempt, "error": repr(exc)},
            )
            return job
        metrics.REQUESTS_PUBLISHED.labels(job.priority.value).inc()
        attempt = job.attempt
        return await self._change(job.job_id, lambda j: j.published(attempt, now), first=job)

    async def _change(self, job_id: str, change: Callable[[Job], Job], *, first: Job | None = None) -> Job:
        """Apply ``change`` by compare-and-set, deciding again on the fresh job after a lost race."""
        job = first
        for attempt in range(CHANGE_TRIES):
            if job is None:
                job = await self.store.get_job(job_id)
                if job is None:
                    raise NotFoundError(f"no job {job_id}")
            changed = change(job)
            if changed is job:
                return job
            stored = await self.store.update_job(changed)
            if stored is not None:
                if stored.state is not job.state:
                    metrics.TRANSITIONS.labels(job.state.value, stored.state.value).inc()
                    log.info(
                        "job %s",
                        stored.state.value,
                        extra={"job_id": job_id, "from": job.state.value, "attempt": stored.attempt},
                    )
                return stored
            job = None
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
        raise ConcurrentChangeError(f"job {job_id} kept changing; not changed after {CHANGE_TRIES} tries")
