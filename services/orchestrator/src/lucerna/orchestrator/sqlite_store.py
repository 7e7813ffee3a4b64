"""The embedded job store on SQLite (stdlib ``sqlite3``): ``<data_dir>/orchestrator.sqlite``.

It sits on the platform's ``SqliteDatabase`` (a writer thread, reader threads, WAL, busy timeout).
Each write is one ``BEGIN IMMEDIATE`` transaction, so worker processes sharing the file
(docs/adr/0005) are serialised by SQLite's lock; a job's change is an ``UPDATE ... WHERE version =
?``, which only one writer can win. Jobs keep
their record as JSON text beside indexed copies of the columns queries filter and sort on.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lucerna.core.storage.sqlite import SqliteDatabase
from lucerna.orchestrator.jobs import Job, JobState
from lucerna.orchestrator.records import (
    dead_letter_from_record,
    dead_letter_record,
    instances_from_json,
    instances_json,
    job_from_record,
    job_record,
    study_from_record,
    study_record,
)
from lucerna.orchestrator.store import DeadLetterRecord
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,           -- epoch seconds
    publish_pending INTEGER NOT NULL,   -- outbox: the current attempt's request is not yet published
    publish_after REAL,
    deadline REAL,
    version INTEGER NOT NULL,
    record TEXT NOT NULL                -- the whole job, JSON (records.job_record)
);
CREATE INDEX IF NOT EXISTS jobs_newest ON jobs (created_at DESC, job_id);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid, created_at DESC);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at DESC);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model, created_at DESC);
CREATE INDEX IF NOT EXISTS jobs_to_publish ON jobs (publish_after) WHERE publish_pending = 1;
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (deadline) WHERE state = 'running';

CREATE TABLE IF NOT EXISTS instance_sets (
    sha256 TEXT PRIMARY KEY,
    instances TEXT NOT NULL             -- JSON list of instance references
);

CREATE TABLE IF NOT EXISTS studies (   -- the last study.ready snapshot of each study
    study_uid TEXT PRIMARY KEY,
    burst INTEGER NOT NULL,
    record TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS dead_letters (
    record_id TEXT PRIMARY KEY,
    dead_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_newest ON dead_letters (dead_at DESC, record_id);
"""


class SqliteJobStore:
    """The ``JobStore`` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA)

    async def start(self) -> None:
        """Open the file (WAL mode) and create the tables."""
        await self._db.start()

    async def close(self) -> None:
        """Close the connections and stop the threads."""
        await self._db.close()

    async def ping(self) -> bool:
        """True when the file answers a query."""
        return await self._db.ping()

    async def put_instance_set(self, sha256: str, instances: Sequence[InstanceRef]) -> None:
        """Keep the set once."""
        text = instances_json(instances)
        await self._db.write(
            lambda c: c.execute("INSERT OR IGNORE INTO instance_sets VALUES (?, ?)", (sha256, text))
        )

    async def get_instance_set(self, sha256: str) -> tuple[InstanceRef, ...] | None:
        """The set, or None."""
        row = await self._db.read(
            lambda c: c.execute("SELECT instances FROM instance_sets WHERE sha256 = ?", (sha256,)).fetchone()
        )
        return None if row is None else instances_from_json(row[0])

    async def put_study(self, study: StudySnapshot) -> None:
        """Keep the instance set, then the snapshot unless a later burst's is kept."""
        await self.put_instance_set(study.instance_set_sha256, study.instances)
        record = json.dumps(study_record(study))
        await self._db.write(
            lambda c: c.execute(
                "INSERT INTO studies VALUES (?, ?, ?) ON CONFLICT (study_uid) DO UPDATE"
                " SET burst = excluded.burst, record = excluded.record WHERE excluded.burst >= burst",
                (study.study_uid, study.burst, record),
            )
        )

    async def get_study(self, study_uid: str) -> StudySnapshot | None:
        """The snapshot with its instances, or None."""
        row = await self._db.read(
            lambda c: c.execute("SELECT record FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        )
        if row is None:
            return None
        record = json.loads(row[0])
        instances = await self.get_instance_set(record["instance_set_sha256"])
        return study_from_record(record, instances or ())

    async def create_job(self, job: Job) -> tuple[Job, bool]:
        """Insert unless the id is taken; the stored job and whether it was inserted."""

        def work(connection: sqlite3.Connection) -> tuple[Job, bool]:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)", _job_row(job)
            )
            if cursor.rowcount == 1:
                return _with_version(job, 0), True
            row = connection.execute(
                "SELECT record, version FROM jobs WHERE job_id = ?", (job.job_id,)
            ).fetchone()
            return _job(row), False

        return await self._db.write(work)

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or None."""
        row = await self._db.read(
            lambda c: c.execute("SELECT record, version FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        )
        return None if row is None else _job(row)

    async def list_jobs(
        self,
        *,
        study_uid: str | None = None,
        state: JobState | None = None,
        model: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """Jobs meeting the filters, newest first."""
        clauses, parameters = [], []
        for column, value in (("study_uid", study_uid), ("state", state and state.value), ("model", model)):
            if value is not None:
                clauses.append(f"{column} = ?")
                parameters.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT record, version FROM jobs {where} ORDER BY created_at DESC, job_id LIMIT ? OFFSET ?"  # noqa: S608 - fixed column names
        rows = await self._db.read(lambda c: c.execute(sql, (*parameters, limit, offset)).fetchall())
        return [_job(row) for row in rows]

    async def update_job(self, job: Job) -> Job | None:
        """Compare-and-set on the version."""
        job_id, _, _, state, _, pending, after, deadline, record = _job_row(job)

        def work(connection: sqlite3.Connection) -> int:
            return connection.execute(
                "UPDATE jobs SET state = ?, publish_pending = ?, publish_after = ?, deadline = ?,"
                " record = ?, version = version + 1 WHERE job_id = ? AND version = ?",
                (state, pending, after, deadline, record, job_id, job.version),
            ).rowcount

        return _with_version(job, job.version + 1) if await self._db.write(work) == 1 else None

    async def due_publications(self, now: datetime, limit: int = 100) -> list[Job]:
        """The outbox's due jobs, oldest due first."""
        rows = await self._db.read(
            lambda c: c.execute(
                "SELECT record, version FROM jobs WHERE publish_pending = 1 AND publish_after <= ?"
                " ORDER BY publish_after, job_id LIMIT ?",
                (now.timestamp(), limit),
            ).fetchall()
        )
        return [_job(row) for row in rows]

    async def overdue_jobs(self, now: datetime, limit: int = 100) -> list[Job]:
        """Running jobs past their deadline."""
        rows = await self._db.read(
            lambda c: c.execute(
                "SELECT record, version FROM jobs WHERE state = 'running' AND deadline <= ?"
                " ORDER BY deadline, job_id LIMIT ?",
                (now.timestamp(), limit),
            ).fetchall()
        )
        return [_job(row) for row in rows]

    async def add_dead_letter(self, record: DeadLetterRecord) -> bool:
        """Insert unless recorded already."""
        text = json.dumps(dead_letter_record(record))
        inserted = await self._db.write(
            lambda c: (
                c.execute(
                    "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?)",
                    (record.record_id, record.dead_at.timestamp(), text),
                ).rowcount
            )
        )
        return bool(inserted == 1)

    async def list_dead_letters(self, limit: int = 100, offset: int = 0) -> list[DeadLetterRecord]:
        """Newest first."""
        rows = await self._db.read(
            lambda c: c.execute(
                "SELECT record FROM dead_letters ORDER BY dead_at DESC, record_id LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        )
        return [dead_letter_from_record(json.loads(row[0])) for row in rows]


def _job_row(job: Job) -> tuple[Any, ...]:
    return (
        job.job_id,
        job.study_uid,
        job.model,
        job.state.value,
        job.created_at.timestamp(),
        int(job.publish_pending),
        job.publish_after.timestamp() if job.publish_after else None,
        job.deadline.timestamp() if job.deadline else None,
        json.dumps(job_record(job), separators=(",", ":")),
    )


def _job(row: tuple[str, int]) -> Job:
    return job_from_record(json.loads(row[0]), row[1])


def _with_version(job: Job, version: int) -> Job:
    return dataclasses.replace(job, version=version)
