"""The search index of patient-data accesses (``PATIENT_DATA_READ`` entries), behind which the FHIR
``AuditEvent`` search runs (IHE BALP style), with a SQLite and a MongoDB adapter.

One row per entry, by its sequence number (the AuditEvent's id): when, the interaction and whether
it was a query, who (the agent), the emitting service, the outcome, the resources disclosed, and the
patient as a blind index only (``PhiKeys.patient_index``), never the reference itself. The index is
derived from the log: putting an entry twice (a redelivery) changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pymongo import DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from lucerna.core.storage.backing import Document, MongoBacked, SqliteBacked
from lucerna.events.v1 import events_pb2

# DICOM codes of AuditEvent.type (IHE BALP): a read of a patient's record, or a query.
PATIENT_RECORD = "110110"
QUERY = "110112"
QUERY_INTERACTIONS = frozenset({"search-type", "search-system", "qido-rs"})
_QIDO_ENDINGS = ("/studies", "/series", "/instances", "/search")
MAX_ENTITIES = 1000  # per entry; a larger search is indexed by its first ones


@dataclass(frozen=True)
class IndexedEvent:
    """What the AuditEvent search matches an entry on."""

    seq: int
    key: str
    recorded: datetime
    type: str  # PATIENT_RECORD or QUERY
    subtype: str
    action: str  # FHIR AuditEvent.action: R (read) or E (execute: a query)
    agent: str
    service: str
    outcome: int
    patient: str  # blind index, "" when no patient is named
    entities: tuple[str, ...] = ()


def interaction(record: events_pb2.AuditRecord) -> str:
    """The record's interaction; DICOMweb records that predate ``subtype`` say it by their route."""
    if record.subtype:
        return record.subtype
    route = record.details.get("route", "")
    if not route:
        return ""
    return "qido-rs" if route.endswith(_QIDO_ENDINGS) else "wado-rs"


def indexed(seq: int, key: str, record: events_pb2.AuditRecord, patient_index: str) -> IndexedEvent:
    """The index row of the entry ``seq`` (``record`` as received, ``patient_index`` of its patient)."""
    subtype = interaction(record)
    query = subtype in QUERY_INTERACTIONS
    return IndexedEvent(
        seq=seq,
        key=key,
        recorded=record.at.ToDatetime(tzinfo=UTC),
        type=QUERY if query else PATIENT_RECORD,
        subtype=subtype,
        action="E" if query else "R",
        agent=record.actor,
        service=record.service,
        outcome=record.outcome,
        patient=patient_index,
        entities=tuple(dict.fromkeys(record.entities))[:MAX_ENTITIES],
    )


FIELDS = frozenset({"patient", "entity", "agent", "type", "subtype", "action", "outcome"})


@dataclass(frozen=True)
class EventQuery:
    """Every ``(field, alternatives)`` of ``match`` must hold (a field may come more than once);
    ``since``/``until`` bound ``recorded`` as a half-open range [since, until). Newest first.
    ``patient`` values are blind indexes; ``outcome`` values are numbers."""

    match: tuple[tuple[str, tuple[str | int, ...]], ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    count: int = 20
    offset: int = 0
    with_total: bool = True

    def __post_init__(self) -> None:
        unknown = {name for name, _ in self.match} - FIELDS
        if unknown:
            raise ValueError(f"not an indexed field: {', '.join(sorted(unknown))}")


class AuditEventIndex(Protocol):
    """The index of patient-data accesses."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def put(self, events: Sequence[IndexedEvent]) -> list[bool]:
        """Index the events not indexed yet; per event, whether it was new."""
        ...

    async def get(self, seq: int) -> IndexedEvent | None:
        """The indexed entry ``seq``, or None (not indexed: not a patient-data access)."""
        ...

    async def search(self, query: EventQuery) -> tuple[list[IndexedEvent], int | None]:
        """A page of matches, newest first, and how many match in all (None unless asked)."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS auditevents (
    seq INTEGER PRIMARY KEY,            -- the log entry, and the AuditEvent's id
    key TEXT NOT NULL,
    recorded REAL NOT NULL,             -- epoch seconds
    type TEXT NOT NULL,
    subtype TEXT NOT NULL,
    action TEXT NOT NULL,
    agent TEXT NOT NULL,
    service TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    patient TEXT NOT NULL               -- blind index (HMAC), never the reference
);
CREATE INDEX IF NOT EXISTS auditevents_patient ON auditevents (patient, seq);
CREATE INDEX IF NOT EXISTS auditevents_agent ON auditevents (agent, seq);
CREATE INDEX IF NOT EXISTS auditevents_recorded ON auditevents (recorded);
CREATE TABLE IF NOT EXISTS auditevent_entities (
    entity TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (entity, seq)
) WITHOUT ROWID;
"""

_COLUMNS = "seq, key, recorded, type, subtype, action, agent, service, outcome, patient"


class SqliteAuditEventIndex(SqliteBacked):
    """``AuditEventIndex`` in a SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    async def put(self, events: Sequence[IndexedEvent]) -> list[bool]:
        """One transaction; a row already there stays."""

        def work(c: sqlite3.Connection) -> list[bool]:
            new = []
            for event in events:
                cursor = c.execute(
                    f"INSERT OR IGNORE INTO auditevents ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant columns
                    (
                        event.seq,
                        event.key,
                        event.recorded.timestamp(),
                        event.type,
                        event.subtype,
                        event.action,
                        event.agent,
                        event.service,
                        event.outcome,
                        event.patient,
                    ),
                )
                new.append(cursor.rowcount > 0)
                c.executemany(
                    "INSERT OR IGNORE INTO auditevent_entities VALUES (?, ?)",
                    [(entity, event.seq) for entity in event.entities],
                )
            return new

        return await self._db.write(work) if events else []

    async def get(self, seq: int) -> IndexedEvent | None:
        """The row of ``seq`` with its entities, or None."""

        def work(c: sqlite3.Connection) -> IndexedEvent | None:
            row = c.execute(f"SELECT {_COLUMNS} FROM auditevents WHERE seq = ?", (seq,)).fetchone()  # noqa: S608
            return None if row is None else _event_of(c, row)

        return await self._db.read(work)

    async def search(self, query: EventQuery) -> tuple[list[IndexedEvent], int | None]:
        """The WHERE clause of every conjunct, newest first."""
        where, args = _where(query)

        def work(c: sqlite3.Connection) -> tuple[list[IndexedEvent], int | None]:
            rows = c.execute(
                f"SELECT {_COLUMNS} FROM auditevents WHERE {where} ORDER BY seq DESC LIMIT ? OFFSET ?",  # noqa: S608
                [*args, query.count, query.offset],
            ).fetchall()
            total = None
            if query.with_total:
                total = int(c.execute(f"SELECT COUNT(*) FROM auditevents WHERE {where}", args).fetchone()[0])  # noqa: S608
            return [_event_of(c, row) for row in rows], total

        return await self._db.read(work)


def _where(query: EventQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = ["1 = 1"]
    args: list[Any] = []
    for name, values in query.match:
        marks = ", ".join("?" * len(values))
        if name == "entity":
            clauses.append(f"seq IN (SELECT seq FROM auditevent_entities WHERE entity IN ({marks}))")  # noqa: S608 - placeholders only
        else:
            clauses.append(f"{name} IN ({marks})")  # a name of FIELDS, checked by EventQuery
        args.extend(values)
    if query.since is not None:
        clauses.append("recorded >= ?")
        args.append(query.since.timestamp())
    if query.until is not None:
        clauses.append("recorded < ?")
        args.append(query.until.timestamp())
    return " AND ".join(clauses), args


def _event_of(c: sqlite3.Connection, row: Sequence[Any]) -> IndexedEvent:
    seq, key, recorded, type_, subtype, action, agent, service, outcome, patient = row
    entities = [
        entity
        for (entity,) in c.execute(
            "SELECT entity FROM auditevent_entities WHERE seq = ? ORDER BY entity", (seq,)
        )
    ]
    return IndexedEvent(
        seq,
        key,
        datetime.fromtimestamp(recorded, UTC),
        type_,
        subtype,
        action,
        agent,
        service,
        outcome,
        patient,
        tuple(entities),
    )


class MongoAuditEventIndex(MongoBacked):
    """``AuditEventIndex`` in MongoDB (``audit_events``, ``_id`` = seq)."""

    @property
    def _events(self) -> AsyncCollection[Document]:
        return self.collection("audit_events")

    async def put(self, events: Sequence[IndexedEvent]) -> list[bool]:
        """Insert all, unordered; a taken ``_id`` (already indexed) is not new."""
        if not events:
            return []
        taken: set[int] = set()
        try:
            await self._events.insert_many([_document(event) for event in events], ordered=False)
        except BulkWriteError as error:
            errors = error.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors):
                raise
            taken = {events[e["index"]].seq for e in errors}
        return [event.seq not in taken for event in events]

    async def get(self, seq: int) -> IndexedEvent | None:
        """The document of ``seq``, or None."""
        document = await self._events.find_one({"_id": seq})
        return None if document is None else _event_of_document(document)

    async def search(self, query: EventQuery) -> tuple[list[IndexedEvent], int | None]:
        """A filter of every conjunct, sorted by ``_id`` descending."""
        selector = _selector(query)
        found = self._events.find(selector).sort("_id", DESCENDING).skip(query.offset).limit(query.count)
        page = [_event_of_document(document) async for document in found] if query.count else []
        total = await self._events.count_documents(selector) if query.with_total else None
        return page, total


_DUPLICATE_KEY = 11000


def _selector(query: EventQuery) -> Document:
    conditions: list[Document] = [
        {"entities" if name == "entity" else name: {"$in": list(values)}} for name, values in query.match
    ]
    if query.since is not None:
        conditions.append({"recorded": {"$gte": query.since}})
    if query.until is not None:
        conditions.append({"recorded": {"$lt": query.until}})
    return {"$and": conditions} if conditions else {}


def _document(event: IndexedEvent) -> Document:
    return {
        "_id": event.seq,
        "key": event.key,
        "recorded": event.recorded,
        "type": event.type,
        "subtype": event.subtype,
        "action": event.action,
        "agent": event.agent,
        "service": event.service,
        "outcome": event.outcome,
        "patient": event.patient,
        "entities": list(event.entities),
    }


def _event_of_document(document: Document) -> IndexedEvent:
    return IndexedEvent(
        seq=int(document["_id"]),
        key=document["key"],
        recorded=document["recorded"],
        type=document["type"],
        subtype=document["subtype"],
        action=document["action"],
        agent=document["agent"],
        service=document["service"],
        outcome=int(document["outcome"]),
        patient=document["patient"],
        entities=tuple(document["entities"]),
    )
