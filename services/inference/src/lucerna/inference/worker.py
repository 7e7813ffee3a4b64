"""The inference worker: one ``InferenceRequested`` in, one stored result and ``InferenceCompleted`` out.

Handling a job (``process``):

- a job whose result is already stored (a redelivery, a job run twice) publishes that result again
  and is acknowledged: a job never has two results;
- otherwise: ``InferenceStarted`` and the JOB_STARTED audit record; the instances' bytes from the
  blob store; pixels decoded, the largest series of usable (grey-level) images preprocessed; Triton
  run; findings made; the result inserted (if absent) and ``InferenceCompleted`` plus JOB_FINISHED
  published, then the result's outbox flag cleared. A result the bus did not take stays flagged and
  is published again by ``relay_unpublished``.
- a job that can never succeed (unknown model or version, instance bytes missing, undecodable
  pixels, no instance the model can read) publishes ``InferenceFailed`` with the reason and is
  acknowledged; the worker goes on with other jobs;
- Triton unavailable: the job is held, not retried. Its delivery stays unacknowledged while the
  worker waits with backoff for Triton to answer again (``triton_ready`` is False meanwhile), so an
  outage, however long, does not burn the queue's delivery limit and dead-letter good work; a
  shutdown while waiting hands the message back to the queue.
- an unparseable message raises ``PermanentError`` (dead-lettered at once); anything unexpected
  raises, and the bus retries with backoff up to the delivery limit.

Scheduling: the bus hands deliveries of both queues (``inference.stat``, ``inference.routine``) to
``handle``, which queues them locally by priority; ``slots`` tasks take STAT jobs before routine
ones, so a STAT job that arrives behind a routine backlog waits only for the jobs already running.
This module imports no transport: the bus, blob store, result store and Triton are ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy.typing as npt

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.events import codec
from lucerna.core.events.codec import TRACEPARENT
from lucerna.core.events.ports import Envelope, MessageBus, PermanentError, PublishError
from lucerna.core.events.topology import INFERENCE_REQUESTED_ROUTINE, INFERENCE_REQUESTED_STAT
from lucerna.core.model_manifest import Manifest
from lucerna.events.v1 import events_pb2
from lucerna.inference import events, metrics, postprocess
from lucerna.inference.pixels import DecodedInstance, NoPixelData, UndecodablePixels, decode
from lucerna.inference.preprocess import Prepared, prepare, slices_of
from lucerna.inference.results import ResultStore, StoredResult
from lucerna.inference.triton import InferenceBackend, TritonUnavailable

Array = npt.NDArray[Any]

log = logging.getLogger(__name__)

STAT, ROUTINE = 0, 1  # local queue ranks: lower first
RELAY_BATCH = 100


class BlobReader(Protocol):
    """Where instance bytes are read by SHA-256."""

    async def get(self, sha256: str) -> bytes:
        """The bytes; ``KeyError`` when absent."""
        ...


class JobFailedError(Exception):
    """A job that can never succeed; the message is the reason published in InferenceFailed."""


class HandedBackError(Exception):
    """The worker is stopping: the delivery goes back to its queue for another worker."""


@dataclass(frozen=True)
class Ports:
    """What the worker talks to."""

    bus: MessageBus
    blobs: BlobReader
    results: ResultStore
    backend: InferenceBackend
    audit: AuditTrail  # the audit records' way to the log (the bus, or the audit service's channel)


@dataclass(eq=False)  # hashed by identity: kept in a set while running
class _Job:
    envelope: Envelope
    request: events_pb2.InferenceRequested
    rank: int
    done: asyncio.Future[None]
    task: asyncio.Task[None] | None = None


@dataclass
class _Stages:
    load: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    started: float = field(default_factory=time.perf_counter)


class InferenceWorker:
    """Runs inference jobs from the bus over the models of ``manifests``."""

    def __init__(
        self,
        ports: Ports,
        manifests: Mapping[str, Manifest],
        *,
        worker_name: str,
        slots: int = 2,
        backoff_min: float = 0.5,
        backoff_max: float = 15.0,
        stop_grace: float = 10.0,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._ports = ports
        self._manifests = dict(manifests)
        self._worker = worker_name
        self._slots = slots
        self._backoff = (backoff_min, backoff_max)
        self._stop_grace = stop_grace
        self._queue: asyncio.PriorityQueue[tuple[int, int, _Job]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[_Job] = set()
        self._stopping = asyncio.Event()
        self._triton_ready = True
        self._waiting = 0

    @property
    def triton_ready(self) -> bool:
        """False while a job waits for Triton to answer again."""
        return self._triton_ready

    def set_triton_ready(self, ready: bool) -> None:
        """Record Triton's state as seen by a probe (start-up, the readiness check)."""
        self._triton_ready = ready
        metrics.TRITON_READY.set(1 if ready else 0)

    async def start(self) -> None:
        """Start the processing slots."""
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._slot(), name=f"inference-slot-{i}") for i in range(self._slots)
        ]

    async def stop(self) -> None:
        """Hand queued and Triton-waiting jobs back at once, give running ones a grace period, then
        cancel them and hand them back too."""
        self._stopping.set()
        while not self._queue.empty():
            _, _, job = self._queue.get_nowait()
            metrics.QUEUED.labels(_priority_name(job.rank)).dec()
            if not job.done.done():
                job.done.set_exception(HandedBackError("the worker is stopping"))
        running = [job.task for job in self._running if job.task is not None]
        if running:
            _, late = await asyncio.wait(running, timeout=self._stop_grace)
            for task in late:
                task.cancel()
        for slot in self._tasks:
            slot.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def handle(self, envelope: Envelope) -> None:
        """The bus handler of both inference queues: queue the job by priority and wait for its outcome."""
        request = codec.decode(envelope, events_pb2.InferenceRequested)
        if not request.job_id or not request.model:
            raise PermanentError("InferenceRequested without job_id or model")
        if self._stopping.is_set():
            raise HandedBackError("the worker is stopping")
        stat = request.priority == events_pb2.STAT or (
            request.priority == events_pb2.PRIORITY_UNSPECIFIED and ".stat." in envelope.routing_key
        )
        job = _Job(envelope, request, STAT if stat else ROUTINE, asyncio.get_running_loop().create_future())
        metrics.QUEUED.labels(_priority_name(job.rank)).inc()
        self._queue.put_nowait((job.rank, next(self._order), job))
        try:
            await job.done
        except asyncio.CancelledError:
            # The bus gave up on the delivery (closing past its grace): stop the work for it too.
            if job.task is not None:
                job.task.cancel()
            raise

    async def _slot(self) -> None:
        while True:
            _, _, job = await self._queue.get()
            metrics.QUEUED.labels(_priority_name(job.rank)).dec()
            if job.done.done():  # its delivery was given up while queued
                continue
            job.task = asyncio.create_task(self.process(job.envelope, job.request))
            self._running.add(job)
            try:
                await asyncio.wait({job.task})
            finally:
                self._running.discard(job)
                if not job.task.done():  # the slot itself is cancelled
                    job.task.cancel()
                    await asyncio.wait({job.task})
                _settle(job)

    async def process(self, envelope: Envelope, request: events_pb2.InferenceRequested) -> None:
        """Run one job to its outcome: returns once its result or failure is published."""
        taken_at = datetime.now(UTC)
        traceparent = envelope.headers.get(TRACEPARENT)
        existing = await self._ports.results.get(request.job_id)
        if existing is not None:
            log.info("job already has a result; publishing it again", extra={"job_id": request.job_id})
            metrics.JOBS.labels(request.model, "already_completed").inc()
            metrics.RESULTS_REPUBLISHED.inc()
            await self.publish_result(existing, traceparent)
            return
        manifest = self._manifests.get(request.model)
        weights = manifest.weights.sha256 if manifest is not None else ""
        try:
            manifest = self._model_for(request)
            await self._ports.bus.publish(events.started(request, self._worker, taken_at, traceparent))
            await self._ports.audit.record(
                events.audit_started(request, self._worker, weights, taken_at, traceparent)
            )
            result = await self._run(request, manifest, taken_at)
        except JobFailedError as failure:
            await self._fail(request, str(failure), weights, traceparent)
            return
        stored, created = await self._ports.results.insert(result)
        if not created:
            log.info("another worker stored this job's result first", extra={"job_id": request.job_id})
        metrics.JOBS.labels(request.model, "completed").inc()
        await self.publish_result(stored, traceparent)

    def _model_for(self, request: events_pb2.InferenceRequested) -> Manifest:
        manifest = self._manifests.get(request.model)
        if manifest is None:
            raise JobFailedError(
                f"unknown model {request.model!r}: "
                f"this worker serves {sorted(self._manifests) or 'no models'}"
            )
        if request.model_version and request.model_version != manifest.version:
            raise JobFailedError(
                f"model {request.model} version {request.model_version} was requested; "
                f"this worker serves version {manifest.version}"
            )
        return manifest

    async def publish_result(self, stored: StoredResult, traceparent: str | None = None) -> bool:
        """Publish a stored result's InferenceCompleted and JOB_FINISHED, then clear its outbox flag.
        A bus that does not take them leaves the flag for the relay; returns whether they were published."""
        try:
            await self._ports.bus.publish(events.completed(stored.completed, traceparent))
            await self._ports.audit.record(events.audit_finished(stored.completed, self._worker, traceparent))
        except PublishError as exc:
            log.warning(
                "result stored but not published; the outbox relay publishes it later",
                extra={"job_id": stored.job_id, "error": str(exc)},
            )
            return False
        if not stored.completed_published:
            await self._ports.results.mark_published(stored.job_id)
        return True

    async def relay_unpublished(self) -> int:
        """Publish the results whose InferenceCompleted the bus has not confirmed; returns how many."""
        relayed = 0
        while True:
            pending = await self._ports.results.unpublished(RELAY_BATCH)
            for stored in pending:
                if not await self.publish_result(stored):
                    return relayed
                relayed += 1
                metrics.RESULTS_REPUBLISHED.inc()
            if len(pending) < RELAY_BATCH:
                return relayed

    async def _fail(
        self, request: events_pb2.InferenceRequested, reason: str, weights: str, traceparent: str | None
    ) -> None:
        now = datetime.now(UTC)
        log.warning("job failed for good", extra={"job_id": request.job_id, "reason": reason})
        metrics.JOBS.labels(request.model, "failed").inc()
        metrics.FAILURES.labels(request.model, _reason_kind(reason)).inc()
        await self._ports.bus.publish(events.failed(request, reason, now, traceparent))
        try:
            await self._ports.audit.record(
                events.audit_failed(
                    request,
                    worker=self._worker,
                    weights_sha256=weights,
                    reason=reason,
                    at=now,
                    traceparent=traceparent,
                )
            )
        except PublishError:
            log.exception("audit record of a failed job not published", extra={"job_id": request.job_id})

    async def _run(
        self, request: events_pb2.InferenceRequested, manifest: Manifest, taken_at: datetime
    ) -> events_pb2.InferenceCompleted:
        stages = _Stages()
        instances = await self._load(request)
        stages.load = time.perf_counter() - stages.started
        mark = time.perf_counter()
        prepared = await asyncio.to_thread(prepare, slices_of(instances), manifest)
        stages.preprocess = time.perf_counter() - mark
        outputs, stages.inference = await self._infer(manifest, prepared)
        mark = time.perf_counter()
        findings = await asyncio.to_thread(postprocess.findings, outputs, prepared.items, manifest)
        stages.postprocess = time.perf_counter() - mark
        total = time.perf_counter() - stages.started
        queued = (
            max((taken_at - request.requested_at.ToDatetime(tzinfo=UTC)).total_seconds(), 0.0)
            if (request.HasField("requested_at"))
            else 0.0
        )
        for stage, seconds in (
            ("queued", queued),
            ("load", stages.load),
            ("preprocess", stages.preprocess),
            ("inference", stages.inference),
            ("postprocess", stages.postprocess),
            ("total", total),
        ):
            metrics.STAGE_SECONDS.labels(manifest.name, stage).observe(seconds)
        metrics.SLICES.labels(manifest.name).inc(len(prepared))
        used = sorted({item.sop_instance_uid for item in prepared.items})
        return events_pb2.InferenceCompleted(
            job_id=request.job_id,
            attempt=request.attempt,
            study_instance_uid=request.study_instance_uid,
            model=manifest.name,
            model_version=manifest.version,
            weights_sha256=manifest.weights.sha256,
            instance_set_sha256=request.instance_set_sha256,
            findings=findings,
            timings=events_pb2.Timings(
                queued_ms=queued * 1000,
                load_ms=stages.load * 1000,
                preprocess_ms=stages.preprocess * 1000,
                inference_ms=stages.inference * 1000,
                postprocess_ms=stages.postprocess * 1000,
                total_ms=total * 1000,
            ),
            completed_at=datetime.now(UTC),
            result_id=request.job_id,
            patient_id=instances[0].patient_id,
            sop_instance_uids=used,
        )

    async def _load(self, request: events_pb2.InferenceRequested) -> list[DecodedInstance]:
        """The instances of the series the model reads: the largest series of grey-level images."""
        if not request.instances:
            raise JobFailedError("the job lists no instances")
        decoded: list[DecodedInstance] = []
        skipped: Counter[str] = Counter()
        for ref in request.instances:
            try:
                data = await self._ports.blobs.get(ref.sha256)
            except KeyError:
                raise JobFailedError(
                    f"instance bytes missing: {ref.sop_instance_uid} (SHA-256 {ref.sha256})"
                    " is not in the blob store"
                ) from None
            try:
                instance = await asyncio.to_thread(decode, data, ref.sop_instance_uid)
            except NoPixelData:
                skipped["without pixel data"] += 1
                continue
            except UndecodablePixels as exc:
                raise JobFailedError(f"undecodable pixels: {exc}") from exc
            if not instance.monochrome:
                skipped["colour images"] += 1
                continue
            decoded.append(instance)
        if not decoded:
            detail = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))
            raise JobFailedError(f"no instance usable by the model among {len(request.instances)} ({detail})")
        frames: Counter[str] = Counter()
        for instance in decoded:
            frames[instance.series_instance_uid] += instance.frames.shape[0]
        series = min(frames, key=lambda uid: (-frames[uid], uid))
        return [instance for instance in decoded if instance.series_instance_uid == series]

    async def _infer(self, manifest: Manifest, prepared: Prepared) -> tuple[Array, float]:
        """The model's outputs, waiting through Triton outages, and the time of the call that answered."""
        delay = self._backoff[0]
        while True:
            started = time.perf_counter()
            try:
                outputs = await self._ports.backend.infer(manifest, prepared)
            except TritonUnavailable as exc:
                await self._wait_for_triton(manifest, exc, delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            self.set_triton_ready(True)
            return outputs, time.perf_counter() - started

    async def _wait_for_triton(
        self, manifest: Manifest, error: TritonUnavailable, first_delay: float
    ) -> None:
        """Hold the job until Triton serves the model again (checked with backoff); hand it back on stop."""
        self.set_triton_ready(False)
        self._waiting += 1
        metrics.WAITING_FOR_TRITON.set(self._waiting)
        log.warning("Triton unavailable; holding the job until it answers", extra={"error": str(error)})
        delay = first_delay
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    raise HandedBackError("the worker is stopping while Triton is unavailable")
                if await self._ports.backend.ready(manifest):
                    log.info("Triton answers again", extra={"model": manifest.name})
                    self.set_triton_ready(True)
                    return
                delay = min(delay * 2, self._backoff[1])
        finally:
            self._waiting -= 1
            metrics.WAITING_FOR_TRITON.set(self._waiting)


def _settle(job: _Job) -> None:
    """Give a job's delivery its outcome: acknowledged, retried or handed back."""
    if job.done.done() or job.task is None:
        return
    if job.task.cancelled():
        job.done.set_exception(HandedBackError("the worker stopped during the job"))
    elif (error := job.task.exception()) is not None:
        job.done.set_exception(error)
    else:
        job.done.set_result(None)


def _priority_name(rank: int) -> str:
    return "stat" if rank == STAT else "routine"


def _reason_kind(reason: str) -> str:
    """A bounded label for a failure reason (the reason itself names instances)."""
    for prefix in ("unknown model", "instance bytes missing", "undecodable pixels", "no instance usable"):
        if reason.startswith(prefix):
            return prefix.replace(" ", "_")
    if reason.startswith("model ") and "was requested" in reason:
        return "model_version"
    return "other"


def requested_routing_key(priority: int, model: str) -> str:
    """The routing key of an InferenceRequested (for tests and tools publishing jobs by hand)."""
    return (
        f"{INFERENCE_REQUESTED_STAT if priority == events_pb2.STAT else INFERENCE_REQUESTED_ROUTINE}.{model}"
    )
