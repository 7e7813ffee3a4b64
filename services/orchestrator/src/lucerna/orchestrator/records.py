"""How the stores write jobs, snapshots, instance sets and dead letters: JSON-able dictionaries
(UTC ISO 8601 timestamps), the same for SQLite and MongoDB."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from lucerna.orchestrator.jobs import Job, JobState, Priority, Transition
from lucerna.orchestrator.store import DeadLetterRecord
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot

Record = dict[str, Any]

_JOB_TIMES = (
    "created_at",
    "queued_at",
    "requested_at",
    "started_at",
    "finished_at",
    "deadline",
    "publish_after",
)


def utc(moment: datetime) -> datetime:
    """A timezone-aware time in UTC (naive times are taken as UTC, as MongoDB returns them)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return None if moment is None else utc(moment).isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else utc(datetime.fromisoformat(value))


def job_record(job: Job) -> Record:
    """A job as a JSON-able dictionary (its ``version`` is kept by the store beside it)."""
    record = dataclasses.asdict(job)
    del record["version"]
    for name in _JOB_TIMES:
        record[name] = iso(getattr(job, name))
    record["state"] = job.state.value
    record["priority"] = job.priority.value
    record["history"] = [transition_record(entry) for entry in job.history]
    return record


def transition_record(entry: Transition) -> Record:
    """A history entry as a JSON-able dictionary (``from`` is None for the job's creation)."""
    return {
        "at": iso(entry.at),
        "from": entry.from_state.value if entry.from_state else None,
        "to": entry.to_state.value,
        "attempt": entry.attempt,
        "reason": entry.reason,
    }


def job_from_record(record: Record, version: int) -> Job:
    """The job of ``job_record``'s dictionary, at ``version``."""
    values = dict(record)
    for name in _JOB_TIMES:
        values[name] = _time(values[name])
    values["state"] = JobState(values["state"])
    values["priority"] = Priority(values["priority"])
    values["history"] = tuple(
        Transition(
            at=utc(datetime.fromisoformat(entry["at"])),
            from_state=JobState(entry["from"]) if entry["from"] else None,
            to_state=JobState(entry["to"]),
            attempt=entry["attempt"],
            reason=entry["reason"],
        )
        for entry in values["history"]
    )
    return Job(**values, version=version)


def instances_json(instances: Sequence[InstanceRef]) -> str:
    """An instance set as compact JSON text (a list of objects)."""
    return json.dumps([dataclasses.asdict(i) for i in instances], separators=(",", ":"))


def instances_from_json(text: str) -> tuple[InstanceRef, ...]:
    """The instance set of ``instances_json``."""
    return tuple(InstanceRef(**item) for item in json.loads(text))


def study_record(study: StudySnapshot) -> Record:
    """A study snapshot without its instances (kept as an instance set, by SHA-256)."""
    return {
        "study_uid": study.study_uid,
        "burst": study.burst,
        "ready_at": iso(study.ready_at),
        "study_description": study.study_description,
        "modalities": list(study.modalities),
        "body_parts": list(study.body_parts),
        "sop_class_uids": list(study.sop_class_uids),
        "calling_ae_titles": list(study.calling_ae_titles),
        "instance_set_sha256": study.instance_set_sha256,
    }


def study_from_record(record: Record, instances: Sequence[InstanceRef]) -> StudySnapshot:
    """The snapshot of ``study_record`` with its instance set."""
    return StudySnapshot(
        study_uid=record["study_uid"],
        burst=record["burst"],
        ready_at=utc(datetime.fromisoformat(record["ready_at"])),
        study_description=record["study_description"],
        modalities=tuple(record["modalities"]),
        body_parts=tuple(record["body_parts"]),
        sop_class_uids=tuple(record["sop_class_uids"]),
        calling_ae_titles=tuple(record["calling_ae_titles"]),
        instances=tuple(instances),
    )


def dead_letter_record(record: DeadLetterRecord) -> Record:
    """A dead letter as a JSON-able dictionary."""
    values = dataclasses.asdict(record)
    values["dead_at"] = iso(record.dead_at)
    values["recorded_at"] = iso(record.recorded_at)
    return values


def dead_letter_from_record(values: Record) -> DeadLetterRecord:
    """The dead letter of ``dead_letter_record``."""
    return DeadLetterRecord(
        **{
            **values,
            "dead_at": utc(datetime.fromisoformat(values["dead_at"])),
            "recorded_at": utc(datetime.fromisoformat(values["recorded_at"])),
        }
    )
