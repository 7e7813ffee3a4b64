"""The result store: one stored ``InferenceCompleted`` per job id, and its outbox flag.

A result is inserted once, keyed by its job id; a second insert for the same job (a redelivery, two
workers racing) stores nothing and returns the result already there, so a job never has two
results. ``completed_published`` is False until the bus confirmed the ``InferenceCompleted`` event;
results left unpublished (the bus was down, the process died in between) are found by
``unpublished`` and published again with the same message id.

Adapters: SQLite (``<data_dir>/inference.sqlite``, on the platform's ``SqliteDatabase``) and MongoDB
(collection ``inference_results``, ``_id`` = job id; insert and treat a duplicate key as "exists",
which FerretDB v1 also serves: no transactions are needed).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from lucerna.core.storage.mongo import answers
from lucerna.core.storage.sqlite import SqliteDatabase
from lucerna.events.v1 import events_pb2

COLLECTION = "inference_results"


@dataclass(frozen=True)
class StoredResult:
    """A job's stored result and whether its InferenceCompleted event was confirmed by the bus."""

    job_id: str
    completed: events_pb2.InferenceCompleted
    completed_published: bool
    stored_at: datetime


class ResultStore(Protocol):
    """Where results are kept, keyed by job id."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def get(self, job_id: str) -> StoredResult | None:
        """The job's result, if stored."""
        ...

    async def insert(self, completed: events_pb2.InferenceCompleted) -> tuple[StoredResult, bool]:
        """Store the result unless the job has one; returns what is stored and whether this call stored it."""
        ...

    async def mark_published(self, job_id: str) -> None:
        """Record that the job's InferenceCompleted event was confirmed by the bus."""
        ...

    async def unpublished(self, limit: int = 100) -> list[StoredResult]:
        """Results whose InferenceCompleted is not confirmed yet, oldest first."""
        ...


def _now() -> datetime:
    return datetime.now(UTC)


def _parse(body: bytes) -> events_pb2.InferenceCompleted:
    message = events_pb2.InferenceCompleted()
    message.ParseFromString(body)
    return message


_SCHEMA = """
CREATE TABLE IF NOT EXISTS inference_results (
    job_id TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    result BLOB NOT NULL,                    -- InferenceCompleted, serialized
    completed_published INTEGER NOT NULL,    -- outbox flag: 0 until the bus confirmed the event
    stored_at REAL NOT NULL                  -- epoch seconds
);
CREATE INDEX IF NOT EXISTS inference_results_unpublished
    ON inference_results (stored_at) WHERE completed_published = 0;
"""

_SELECT = "SELECT job_id, result, completed_published, stored_at FROM inference_results"


class SqliteResultStore:
    """Results in one SQLite file, on the platform's ``SqliteDatabase`` (WAL, shared by worker processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA)

    async def start(self) -> None:
        """Open the file and create the table if absent."""
        await self._db.start()

    async def close(self) -> None:
        """Stop the threads and close the connections."""
        await self._db.close()

    async def ping(self) -> bool:
        """True when the file answers a query."""
        return await self._db.ping()

    async def get(self, job_id: str) -> StoredResult | None:
        """The job's result, if stored."""
        row = await self._db.read(lambda c: c.execute(f"{_SELECT} WHERE job_id = ?", (job_id,)).fetchone())
        return None if row is None else _from_row(row)

    async def insert(self, completed: events_pb2.InferenceCompleted) -> tuple[StoredResult, bool]:
        """Store the result unless the job has one (``INSERT OR IGNORE``); returns what is stored."""
        stored_at = _now()
        body = completed.SerializeToString(deterministic=True)

        def work(connection: sqlite3.Connection) -> tuple[tuple[Any, ...], bool]:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO inference_results VALUES (?, ?, ?, ?, 0, ?)",
                (
                    completed.job_id,
                    completed.study_instance_uid,
                    completed.model,
                    body,
                    stored_at.timestamp(),
                ),
            )
            row = connection.execute(
                f"{_SELECT} WHERE job_id = ?",
                (completed.job_id,),
            ).fetchone()
            return row, cursor.rowcount == 1

        row, created = await self._db.write(work)
        return _from_row(row), created

    async def mark_published(self, job_id: str) -> None:
        """Clear the job's outbox flag."""
        await self._db.write(
            lambda c: c.execute(
                "UPDATE inference_results SET completed_published = 1 WHERE job_id = ?", (job_id,)
            )
        )

    async def unpublished(self, limit: int = 100) -> list[StoredResult]:
        """Results not yet confirmed by the bus, oldest first."""
        rows = await self._db.read(
            lambda c: c.execute(
                f"{_SELECT} WHERE completed_published = 0 ORDER BY stored_at LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [_from_row(row) for row in rows]


def _from_row(row: tuple[Any, ...]) -> StoredResult:
    job_id, body, published, stored_at = row
    return StoredResult(job_id, _parse(bytes(body)), bool(published), datetime.fromtimestamp(stored_at, UTC))


class MongoResultStore:
    """Results in the ``inference_results`` collection, ``_id`` = job id."""

    def __init__(self, url: str, database: str, *, client: AsyncMongoClient[Any] | None = None) -> None:
        self._owns_client = client is None
        self._client: AsyncMongoClient[Any] = client or AsyncMongoClient(url, tz_aware=True)
        self._collection = self._client[database][COLLECTION]

    async def start(self) -> None:
        """Create the outbox index if absent."""
        await self._collection.create_index(
            [("completed_published", ASCENDING), ("stored_at", ASCENDING)], name="unpublished"
        )

    async def close(self) -> None:
        """Close the client (if this store made it)."""
        if self._owns_client:
            await self._client.close()

    async def ping(self) -> bool:
        """True when the server answers within three seconds."""
        return await answers(self._client)

    async def get(self, job_id: str) -> StoredResult | None:
        """The job's result, if stored."""
        document = await self._collection.find_one({"_id": job_id})
        return None if document is None else _from_document(document)

    async def insert(self, completed: events_pb2.InferenceCompleted) -> tuple[StoredResult, bool]:
        """Insert with the job id as ``_id``; a duplicate key means the job already has its result."""
        document = {
            "_id": completed.job_id,
            "study_instance_uid": completed.study_instance_uid,
            "model": completed.model,
            "result": completed.SerializeToString(deterministic=True),
            "completed_published": False,
            "stored_at": _now(),
        }
        try:
            await self._collection.insert_one(document)
        except DuplicateKeyError:
            existing = await self.get(completed.job_id)
            if existing is None:  # pragma: no cover - results are never deleted
                raise
            return existing, False
        return _from_document(document), True

    async def mark_published(self, job_id: str) -> None:
        """Clear the job's outbox flag."""
        await self._collection.update_one({"_id": job_id}, {"$set": {"completed_published": True}})

    async def unpublished(self, limit: int = 100) -> list[StoredResult]:
        """Results not yet confirmed by the bus, oldest first."""
        cursor = (
            self._collection.find({"completed_published": False}).sort("stored_at", ASCENDING).limit(limit)
        )
        return [_from_document(document) async for document in cursor]


def _from_document(document: dict[str, Any]) -> StoredResult:
    stored_at: datetime = document["stored_at"]
    if stored_at.tzinfo is None:
        stored_at = stored_at.replace(tzinfo=UTC)
    return StoredResult(
        document["_id"], _parse(bytes(document["result"])), bool(document["completed_published"]), stored_at
    )
