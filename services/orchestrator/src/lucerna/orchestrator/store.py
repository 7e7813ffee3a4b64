"""The orchestrator's storage port: jobs, the study snapshots and instance sets they run over, and
the dead letters of inference requests.

Adapters: ``sqlite_store`` (embedded) and ``mongo_store`` (MongoDB, within what FerretDB v1 serves).
Every write is idempotent or a compare-and-set on a job's ``version``, so that two orchestrator
processes never both win a change of the same job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from lucerna.orchestrator.jobs import Job, JobState
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot


@dataclass(frozen=True)
class DeadLetterRecord:
    """A message dead-lettered from a queue the orchestrator watches, as the job API shows it.

    ``record_id`` is ``<queue>:<message id>``: a dead letter delivered twice is recorded once.
    """

    record_id: str
    queue: str
    message_id: str
    routing_key: str
    type: str
    reason: str
    dead_at: datetime
    recorded_at: datetime
    correlation_id: str = ""
    job_id: str = ""
    attempt: int = 0


class JobStore(Protocol):
    """Where jobs live (``Job.version`` counts their stored changes)."""

    async def start(self) -> None:
        """Connect and create what the store needs (tables, indexes)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def put_instance_set(self, sha256: str, instances: Sequence[InstanceRef]) -> None:
        """Keep an instance set under its SHA-256 (``studies.instance_set_sha256``); idempotent."""
        ...

    async def get_instance_set(self, sha256: str) -> tuple[InstanceRef, ...] | None: ...

    async def put_study(self, study: StudySnapshot) -> None:
        """Keep the study's snapshot unless one of a later burst is kept already."""
        ...

    async def get_study(self, study_uid: str) -> StudySnapshot | None: ...

    async def create_job(self, job: Job) -> tuple[Job, bool]:
        """Insert the job unless its id is taken; the stored job, and whether it was inserted."""
        ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def list_jobs(
        self,
        *,
        study_uid: str | None = None,
        state: JobState | None = None,
        model: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """Jobs meeting every filter given, newest first (then by id)."""
        ...

    async def update_job(self, job: Job) -> Job | None:
        """Store ``job`` if the stored one still has ``job.version``; the stored job (version + 1),
        or None when another writer changed it first (read it again and decide again)."""
        ...

    async def due_publications(self, now: datetime, limit: int = 100) -> list[Job]:
        """Jobs whose request is still to be published and due (``publish_after`` not after ``now``),
        oldest due first (the outbox)."""
        ...

    async def overdue_jobs(self, now: datetime, limit: int = 100) -> list[Job]:
        """Running jobs past their deadline, longest overdue first."""
        ...

    async def add_dead_letter(self, record: DeadLetterRecord) -> bool:
        """Record a dead letter; False when its ``record_id`` was recorded already."""
        ...

    async def list_dead_letters(self, limit: int = 100, offset: int = 0) -> list[DeadLetterRecord]:
        """The recorded dead letters, newest first."""
        ...
