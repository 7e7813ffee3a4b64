"""The events the worker emits, with deterministic message ids so a re-publish is recognised downstream."""

from __future__ import annotations

from datetime import UTC, datetime

from lucerna.core.events import codec
from lucerna.core.events.instance_set import instance_set_text
from lucerna.core.events.ports import Envelope
from lucerna.core.events.topology import (
    AUDIT_RECORD,
    INFERENCE_COMPLETED,
    INFERENCE_FAILED,
    INFERENCE_STARTED,
)
from lucerna.events.v1 import events_pb2

SERVICE = "inference"


def started(
    request: events_pb2.InferenceRequested, worker: str, at: datetime, traceparent: str | None = None
) -> Envelope:
    """``inference.started``: this worker took the job."""
    message = events_pb2.InferenceStarted(
        job_id=request.job_id, attempt=request.attempt, worker=worker, started_at=at
    )
    return codec.encode(
        INFERENCE_STARTED,
        message,
        correlation_id=request.job_id,
        message_id=f"inference-started:{request.job_id}:{request.attempt}",
        timestamp=at,
        traceparent=traceparent,
    )


def completed(message: events_pb2.InferenceCompleted, traceparent: str | None = None) -> Envelope:
    """``inference.completed``: the job's whole result (one message id per job, whatever the attempt)."""
    return codec.encode(
        INFERENCE_COMPLETED,
        message,
        correlation_id=message.job_id,
        message_id=f"inference-completed:{message.job_id}",
        timestamp=message.completed_at.ToDatetime(tzinfo=UTC),
        traceparent=traceparent,
    )


def failed(
    request: events_pb2.InferenceRequested, reason: str, at: datetime, traceparent: str | None = None
) -> Envelope:
    """``inference.failed``: the job cannot succeed, and why."""
    message = events_pb2.InferenceFailed(
        job_id=request.job_id, attempt=request.attempt, reason=reason, failed_at=at
    )
    return codec.encode(
        INFERENCE_FAILED,
        message,
        correlation_id=request.job_id,
        message_id=f"inference-failed:{request.job_id}:{request.attempt}",
        timestamp=at,
        traceparent=traceparent,
    )


def audit_started(
    request: events_pb2.InferenceRequested,
    worker: str,
    weights_sha256: str,
    at: datetime,
    traceparent: str | None = None,
) -> Envelope:
    """The audit record of a job taken by a worker."""
    message = events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.JOB_STARTED,
        service=SERVICE,
        at=at,
        actor=worker,
        study_instance_uid=request.study_instance_uid,
        sha256=request.instance_set_sha256,
        details={
            "job_id": request.job_id,
            "attempt": str(request.attempt),
            "model": request.model,
            "model_version": request.model_version,
            "weights_sha256": weights_sha256,
            "instances": str(len(request.instances)),
            # The instances themselves (ids and hashes), so an auditor can tie the set to the
            # INSTANCE_STORED entry of each one.
            "instance_set": instance_set_text((i.sop_instance_uid, i.sha256) for i in request.instances),
        },
    )
    return codec.encode(
        AUDIT_RECORD,
        message,
        correlation_id=request.job_id,
        message_id=f"audit-job-started:{request.job_id}:{request.attempt}",
        timestamp=at,
        traceparent=traceparent,
    )


def audit_finished(
    result: events_pb2.InferenceCompleted, worker: str, traceparent: str | None = None
) -> Envelope:
    """The audit record of a job's stored result: model, version, weights hash, findings count."""
    at = result.completed_at.ToDatetime(tzinfo=UTC)
    message = events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.JOB_FINISHED,
        service=SERVICE,
        at=at,
        actor=worker,
        study_instance_uid=result.study_instance_uid,
        sha256=result.instance_set_sha256,
        details={
            "job_id": result.job_id,
            "attempt": str(result.attempt),
            "outcome": "completed",
            "model": result.model,
            "model_version": result.model_version,
            "weights_sha256": result.weights_sha256,
            "findings": str(len(result.findings)),
            "result_id": result.result_id,
        },
    )
    return codec.encode(
        AUDIT_RECORD,
        message,
        correlation_id=result.job_id,
        message_id=f"audit-job-finished:{result.job_id}",
        timestamp=at,
        traceparent=traceparent,
    )


def audit_failed(
    request: events_pb2.InferenceRequested,
    *,
    worker: str,
    weights_sha256: str,
    reason: str,
    at: datetime,
    traceparent: str | None = None,
) -> Envelope:
    """The audit record of a job that failed for good. Its id names the attempt: a later attempt of the
    same job may still finish with a result, whose record must not be taken for this one."""
    message = events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.JOB_FINISHED,
        service=SERVICE,
        at=at,
        actor=worker,
        study_instance_uid=request.study_instance_uid,
        sha256=request.instance_set_sha256,
        details={
            "job_id": request.job_id,
            "attempt": str(request.attempt),
            "outcome": "failed",
            "model": request.model,
            "model_version": request.model_version,
            "weights_sha256": weights_sha256,
            "reason": reason[:500],
        },
    )
    return codec.encode(
        AUDIT_RECORD,
        message,
        correlation_id=request.job_id,
        message_id=f"audit-job-failed:{request.job_id}:{request.attempt}",
        timestamp=at,
        traceparent=traceparent,
    )
