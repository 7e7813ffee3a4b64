"""What the FHIR service keeps of each study: its last ``StudyReady`` (the facts an ImagingStudy and
a Patient are built from, and that a later ``InferenceCompleted`` is published against).

The event itself is kept, serialized: it is the contract, and ``StudyFacts.from_study_ready`` reads
it the same way on arrival and later. A later burst replaces an earlier one, never the reverse.
Adapters: SQLite (embedded) and MongoDB (``fhir_studies``, ``_id`` lookups only, as FerretDB v1
serves them fast).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Protocol

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from lucerna.core.storage.backing import Document, MongoBacked, SqliteBacked
from lucerna.events.v1 import events_pb2


class StudyStore(Protocol):
    """The last ``StudyReady`` of each study."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def put(self, ready: events_pb2.StudyReady) -> bool:
        """Keep ``ready`` unless a later burst of the study is kept; whether it was kept."""
        ...

    async def get(self, study_uid: str) -> events_pb2.StudyReady | None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    burst INTEGER NOT NULL,
    event BLOB NOT NULL                 -- the StudyReady, serialized
);
"""


class SqliteStudyStore(SqliteBacked):
    """``StudyStore`` in a SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    async def put(self, ready: events_pb2.StudyReady) -> bool:
        """Upsert unless the kept burst is later."""

        def work(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "INSERT INTO studies (study_uid, burst, event) VALUES (?, ?, ?) "
                "ON CONFLICT (study_uid) DO UPDATE SET burst = excluded.burst, event = excluded.event "
                "WHERE excluded.burst >= studies.burst",
                (ready.study_instance_uid, ready.burst, ready.SerializeToString()),
            )
            return cursor.rowcount > 0

        return await self._db.write(work)

    async def get(self, study_uid: str) -> events_pb2.StudyReady | None:
        """The kept event, or None."""

        def work(connection: sqlite3.Connection) -> bytes | None:
            row = connection.execute("SELECT event FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._db.read(work)
        return None if data is None else events_pb2.StudyReady.FromString(data)


class MongoStudyStore(MongoBacked):
    """``StudyStore`` in MongoDB (``fhir_studies``)."""

    @property
    def _studies(self) -> AsyncCollection[Document]:
        return self.collection("fhir_studies")

    async def put(self, ready: events_pb2.StudyReady) -> bool:
        """Replace unless a later burst is kept (the upsert's insert then hits the taken ``_id``)."""
        document = {"burst": ready.burst, "event": ready.SerializeToString()}
        with contextlib.suppress(DuplicateKeyError):
            await self._studies.replace_one(
                {"_id": ready.study_instance_uid, "burst": {"$lte": ready.burst}}, document, upsert=True
            )
            return True
        return False

    async def get(self, study_uid: str) -> events_pb2.StudyReady | None:
        """The kept event, or None."""
        document = await self._studies.find_one({"_id": study_uid})
        return None if document is None else events_pb2.StudyReady.FromString(bytes(document["event"]))
