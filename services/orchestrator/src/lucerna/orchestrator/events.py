"""The events the orchestrator reads and writes, translated to and from its domain.

``inference.requested.<stat|routine>.<model>`` carries message id ``inference-requested:<job>:<attempt>``
and the job id as correlation id, so that a request published again (the outbox after a crash, a
second orchestrator replica) is recognised by the worker as the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.events.topology import INFERENCE_REQUESTED_ROUTINE, INFERENCE_REQUESTED_STAT
from lucerna.events.v1 import events_pb2
from lucerna.orchestrator.jobs import Job, Priority
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot

INFERENCE_REQUESTED = events_pb2.InferenceRequested.DESCRIPTOR.full_name
INFERENCE_STARTED = events_pb2.InferenceStarted.DESCRIPTOR.full_name
INFERENCE_COMPLETED = events_pb2.InferenceCompleted.DESCRIPTOR.full_name
INFERENCE_FAILED = events_pb2.InferenceFailed.DESCRIPTOR.full_name

_PRIORITY = {Priority.STAT: events_pb2.STAT, Priority.ROUTINE: events_pb2.ROUTINE}


def routing_key(priority: Priority, model: str) -> str:
    """``inference.requested.<stat|routine>.<model>``: the queue of its priority, the model's word."""
    prefix = INFERENCE_REQUESTED_STAT if priority is Priority.STAT else INFERENCE_REQUESTED_ROUTINE
    return f"{prefix}.{model}"


def inference_requested(job: Job, instances: Sequence[InstanceRef], at: datetime) -> Envelope:
    """The request of the job's current attempt."""
    message = events_pb2.InferenceRequested(
        job_id=job.job_id,
        attempt=job.attempt,
        study_instance_uid=job.study_uid,
        model=job.model,
        model_version=job.model_version,
        priority=_PRIORITY[job.priority],
        instance_set_sha256=job.instance_set_sha256,
        instances=[
            events_pb2.InstanceRef(
                sop_instance_uid=i.sop_instance_uid,
                series_instance_uid=i.series_instance_uid,
                sop_class_uid=i.sop_class_uid,
                sha256=i.sha256,
                modality=i.modality,
                body_part=i.body_part,
                transfer_syntax_uid=i.transfer_syntax_uid,
            )
            for i in instances
        ],
        requested_at=at,
        timeout_seconds=job.timeout_seconds,
    )
    return codec.encode(
        routing_key(job.priority, job.model),
        message,
        correlation_id=job.job_id,
        message_id=f"inference-requested:{job.job_id}:{job.attempt}",
        timestamp=at,
    )


def snapshot(message: events_pb2.StudyReady, received_at: datetime) -> StudySnapshot:
    """What a ``study.ready`` says of its study."""
    return StudySnapshot(
        study_uid=message.study_instance_uid,
        burst=message.burst,
        ready_at=time_of(message.ready_at) or received_at,
        study_description=message.study_description,
        modalities=tuple(message.modalities),
        body_parts=tuple(message.body_parts),
        sop_class_uids=tuple(message.sop_class_uids),
        calling_ae_titles=tuple(message.calling_ae_titles),
        instances=tuple(
            InstanceRef(
                sop_instance_uid=i.sop_instance_uid,
                series_instance_uid=i.series_instance_uid,
                sop_class_uid=i.sop_class_uid,
                sha256=i.sha256,
                modality=i.modality,
                body_part=i.body_part,
                transfer_syntax_uid=i.transfer_syntax_uid,
            )
            for i in message.instances
        ),
    )


def time_of(stamp: Timestamp) -> datetime | None:
    """A protobuf timestamp as an aware datetime; None when unset."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.ToDatetime(tzinfo=UTC)
