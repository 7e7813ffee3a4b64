"""Embedded adapters on SQLite (stdlib ``sqlite3``): the metadata store and an FTS5 search index.

Each database file is served by one writer thread holding one connection (every write call is one
``BEGIN IMMEDIATE`` transaction, so concurrent callers are serialised and a batch is all or
nothing) and two reader threads with their own connections; WAL mode lets reads run beside the
writer. Tables follow ``_qido``: one row per study, series and instance with the derived matching
attributes as indexed columns. Beside them, two outboxes written in the instances' transaction:
``assembly_outbox`` (one row per burst not yet announced) and ``audit_outbox`` (one row per created
instance whose audit record is not yet published).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from lucerna.core.dicom.attributes import derive
from lucerna.core.storage import _qido, _search
from lucerna.core.storage._qido import FIELDS_OF, UID_OF, Condition, Plan
from lucerna.core.storage.ports import (
    DicomJson,
    InstanceRecord,
    Level,
    PutOutcome,
    Query,
    ReadyStudy,
    ReindexRunningError,
    StudyPatient,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

_TABLE: dict[Level, str] = {"study": "studies", "series": "series", "instance": "instances"}
_ORDER: dict[Level, str] = {
    "study": "StudyDate DESC, StudyInstanceUID",
    "series": "StudyInstanceUID, SeriesNumber, SeriesInstanceUID",
    "instance": "StudyInstanceUID, SeriesNumber, SeriesInstanceUID, InstanceNumber, SOPInstanceUID",
}
_STUDY_COLUMNS = (
    "StudyInstanceUID, dataset, modalities, NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances"
)
_SELECT: dict[Level, str] = {
    "study": _STUDY_COLUMNS,
    "series": "StudyInstanceUID, SeriesInstanceUID, dataset, NumberOfSeriesRelatedInstances",
    "instance": "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, dataset",
}
_INSTANCE_COLUMNS = (
    "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, sop_class_uid, transfer_syntax_uid, sha256,"
    " size, source, received_at, dataset, attributes"
)
BUSY_TIMEOUT_SECONDS = 10.0  # how long a statement waits for another connection's (or process's) lock
_MANY_PARAMETERS = 500  # longer IN lists go through json_each (SQLite caps bound parameters)


def _columns(level: Level) -> str:
    return ", ".join(f"{kw} {'INTEGER' if _qido.is_number(kw) else 'TEXT'}" for kw in FIELDS_OF[level])


_METADATA_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS studies (
    StudyInstanceUID TEXT PRIMARY KEY,
    {_columns("study")},
    NumberOfStudyRelatedSeries INTEGER NOT NULL,
    NumberOfStudyRelatedInstances INTEGER NOT NULL,
    modalities TEXT NOT NULL,           -- JSON list
    representative TEXT NOT NULL,       -- SOP Instance UID whose data set answers for the study
    dataset TEXT NOT NULL,              -- its study-level elements, DICOM JSON
    burst INTEGER NOT NULL,             -- number of the study's latest burst (see assembly_outbox)
    version INTEGER NOT NULL,           -- index outbox: bumped on every change
    indexed_version INTEGER NOT NULL,
    changed_at REAL NOT NULL            -- first change not yet indexed, epoch seconds
);
CREATE INDEX IF NOT EXISTS studies_by_date ON studies (StudyDate DESC, StudyInstanceUID);
CREATE INDEX IF NOT EXISTS studies_by_patient_name ON studies (PatientName);
CREATE INDEX IF NOT EXISTS studies_by_patient_id ON studies (PatientID);
CREATE INDEX IF NOT EXISTS studies_by_accession ON studies (AccessionNumber);
CREATE INDEX IF NOT EXISTS studies_to_index ON studies (changed_at) WHERE version > indexed_version;

CREATE TABLE IF NOT EXISTS assembly_outbox (  -- bursts not yet announced: open, or claimed and not acked
    StudyInstanceUID TEXT NOT NULL,
    burst INTEGER NOT NULL,
    burst_instances INTEGER NOT NULL,
    sources TEXT NOT NULL,              -- JSON list
    last_arrival REAL NOT NULL,         -- epoch seconds
    boundary INTEGER NOT NULL,
    boundary_at REAL,
    claimed_at REAL,                    -- NULL while open; the claim's lease starts here
    PRIMARY KEY (StudyInstanceUID, burst)
);
CREATE UNIQUE INDEX IF NOT EXISTS assembly_outbox_open ON assembly_outbox (StudyInstanceUID)
    WHERE claimed_at IS NULL;

CREATE TABLE IF NOT EXISTS audit_outbox (  -- created instances whose audit record is not yet published
    SOPInstanceUID TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_outbox_by_age ON audit_outbox (created_at);

CREATE TABLE IF NOT EXISTS removed_studies (  -- index outbox of studies whose last instance left
    StudyInstanceUID TEXT PRIMARY KEY,
    changed_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS series (
    SeriesInstanceUID TEXT PRIMARY KEY,
    StudyInstanceUID TEXT NOT NULL,
    {_columns("series")},
    NumberOfSeriesRelatedInstances INTEGER NOT NULL,
    representative TEXT NOT NULL,
    dataset TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series (StudyInstanceUID, SeriesNumber, SeriesInstanceUID);
CREATE INDEX IF NOT EXISTS series_by_modality ON series (Modality);

CREATE TABLE IF NOT EXISTS instances (
    seq INTEGER PRIMARY KEY,            -- arrival order
    SOPInstanceUID TEXT NOT NULL UNIQUE,
    StudyInstanceUID TEXT NOT NULL,
    SeriesInstanceUID TEXT NOT NULL,
    SeriesNumber INTEGER,               -- for ordering only; matching uses the series row
    {_columns("instance")},
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    source TEXT NOT NULL,
    received_at TEXT NOT NULL,          -- ISO 8601, as given
    dataset TEXT NOT NULL,
    attributes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_in_order
    ON instances (StudyInstanceUID, SeriesNumber, SeriesInstanceUID, InstanceNumber, SOPInstanceUID);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (SeriesInstanceUID, seq);
"""


class SqliteDatabase:
    """One SQLite file: a writer thread and reader threads, each with its own connection, in WAL
    mode with a busy timeout, so that worker processes (docs/adr/0005) can share the file. Every
    embedded store of the platform sits on one of these."""

    def __init__(self, path: Path, schema: str, *, readers: int = 2) -> None:
        self.path = path
        self._schema = schema
        self._reader_threads = readers
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Open the file and create its schema (``CREATE ... IF NOT EXISTS``); again: nothing."""
        if self._writer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="lucerna-sqlite-writer")
        self._readers = ThreadPoolExecutor(self._reader_threads, thread_name_prefix="lucerna-sqlite-reader")
        await self.script(self._schema)

    async def ping(self) -> bool:
        """True when the file answers a query."""
        try:
            return await self.read(lambda c: c.execute("SELECT 1").fetchone() == (1,))
        except (sqlite3.Error, RuntimeError):
            return False

    async def close(self) -> None:
        for executor in (self._writer, self._readers):
            if executor is not None:
                await asyncio.to_thread(executor.shutdown)
        self._writer = self._readers = None
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    async def script(self, sql: str) -> None:
        """Run statements (DDL) outside an explicit transaction, on the writer."""
        await self._run(self._writer, lambda connection: connection.executescript(sql))

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one write transaction on the writer thread."""
        return await self._run(self._writer, lambda conn: _in_transaction(conn, "IMMEDIATE", work))

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on a reader thread, on one consistent snapshot."""
        return await self._run(self._readers, lambda conn: _in_transaction(conn, "DEFERRED", work))

    async def _run(self, executor: ThreadPoolExecutor | None, work: Callable[[sqlite3.Connection], T]) -> T:
        if executor is None:
            raise RuntimeError(f"{self.path} is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, lambda: work(self._connection()))

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # The busy timeout comes first: worker processes (docs/adr/0005) open the same file at
            # once; every statement then waits for the others' locks.
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            _use_wal(connection)
            connection.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; fsync at checkpoints
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection


def _use_wal(connection: sqlite3.Connection) -> None:
    """Switch the file to WAL (it stays so). SQLite answers "locked" at once, without the busy
    timeout, while another process holds a lock on a file changing journal mode: retry for as long."""
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def _in_transaction(connection: sqlite3.Connection, kind: str, work: Callable[[sqlite3.Connection], T]) -> T:
    connection.execute(f"BEGIN {kind}")
    try:
        result = work(connection)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return result


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class SqliteMetadataStore:
    """The metadata store in one SQLite file (``make up``'s default)."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, _METADATA_SCHEMA)

    async def start(self) -> None:
        """Open the file and create tables and indexes if absent."""
        await self._db.start()
        await self._db.write(_move_assembly_state)

    async def close(self) -> None:
        """Stop the threads and close the connections."""
        await self._db.close()

    async def ping(self) -> bool:
        """True when the file answers a query."""
        return await self._db.ping()

    async def put_instances(self, records: Sequence[InstanceRecord]) -> list[PutOutcome]:
        """Upsert a batch in one transaction (see ``MetadataStore.put_instances``)."""
        if not records:
            return []
        return await self._db.write(lambda c: [_put_instance(c, record, time.time()) for record in records])

    async def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """One instance by SOP Instance UID."""
        sql = f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE SOPInstanceUID = ?"  # noqa: S608 - fixed text
        row = await self._db.read(lambda c: c.execute(sql, (sop_instance_uid,)).fetchone())
        return None if row is None else _record(row)

    async def list_instances(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> list[InstanceRecord]:
        """The instances of a study, a series or one instance, in series/instance number order."""
        where, params = ["StudyInstanceUID = ?"], [study_uid]
        if series_uid is not None:
            where.append("SeriesInstanceUID = ?")
            params.append(series_uid)
        if sop_instance_uid is not None:
            where.append("SOPInstanceUID = ?")
            params.append(sop_instance_uid)
        sql = (
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE {' AND '.join(where)}"  # noqa: S608 - fixed text
            " ORDER BY SeriesNumber, InstanceNumber, SOPInstanceUID"
        )
        rows = await self._db.read(lambda c: c.execute(sql, params).fetchall())
        return [_record(row) for row in rows]

    async def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove an instance and update its series and study."""
        await self._db.write(lambda c: _delete_instance(c, sop_instance_uid, time.time()))

    async def study_patients(self, study_uids: Sequence[str]) -> dict[str, StudyPatient]:
        """The patient of each stored study named."""
        uids = list(dict.fromkeys(study_uids))
        if not uids:
            return {}
        sql = (
            "SELECT StudyInstanceUID, PatientID, IssuerOfPatientID FROM studies"  # noqa: S608 - placeholders only
            f" WHERE StudyInstanceUID IN ({', '.join('?' * len(uids))})"
        )
        rows = await self._db.read(lambda c: c.execute(sql, uids).fetchall())
        return {uid: StudyPatient(patient_id or "", issuer or "") for uid, patient_id, issuer in rows}

    async def query(self, query: Query) -> list[DicomJson]:
        """QIDO-RS matching at one level (see ``_qido``)."""
        plan = _qido.plan(query)
        if plan.impossible:
            return []
        where, params = _where(plan)
        sql = (
            f"SELECT {_SELECT[query.level]} FROM {_TABLE[query.level]} {where}"  # noqa: S608 - whitelisted names
            f" ORDER BY {_ORDER[query.level]} LIMIT ? OFFSET ?"
        )
        params += [query.limit, query.offset]
        rows = await self._db.read(lambda c: c.execute(sql, params).fetchall())
        return [_result(query.level, row) for row in rows]

    async def mark_boundary(self, study_uids: Sequence[str], at: datetime) -> None:
        """Set the boundary flag of these studies' open bursts."""
        if not study_uids:
            return
        sql = (
            "UPDATE assembly_outbox SET boundary = 1, boundary_at = ?"
            " WHERE claimed_at IS NULL AND StudyInstanceUID IN (SELECT value FROM json_each(?))"
        )
        await self._db.write(lambda c: c.execute(sql, (_epoch(at), _dumps(list(study_uids)))))

    async def claim_ready(
        self, now: datetime, *, quiet: timedelta, max_idle: timedelta, lease: timedelta, limit: int = 100
    ) -> list[ReadyStudy]:
        """Claim the ended bursts (see ``MetadataStore.claim_ready``); BEGIN IMMEDIATE serialises
        claimers, across processes too."""
        at = _epoch(now)
        return await self._db.write(lambda c: _claim_ready(
            c, at, limit, quiet_before=at - quiet.total_seconds(), idle_before=at - max_idle.total_seconds(),
            expired_before=at - lease.total_seconds(),
        ))

    async def ack_ready(self, study_uid: str, burst: int) -> None:
        """Remove a claimed burst from the assembly outbox."""
        sql = (
            "DELETE FROM assembly_outbox WHERE StudyInstanceUID = ? AND burst = ? AND claimed_at IS NOT NULL"
        )
        await self._db.write(lambda c: c.execute(sql, (study_uid, burst)))

    async def pending_audit(self, stored_before: datetime, limit: int = 100) -> list[InstanceRecord]:
        """Instances in the audit outbox, oldest first."""
        sql = (
            f"SELECT {_INSTANCE_COLUMNS} FROM audit_outbox JOIN instances USING (SOPInstanceUID)"  # noqa: S608
            " WHERE created_at < ? ORDER BY created_at LIMIT ?"
        )
        rows = await self._db.read(lambda c: c.execute(sql, (_epoch(stored_before), limit)).fetchall())
        return [_record(row) for row in rows]

    async def clear_audit(self, sop_instance_uids: Sequence[str]) -> None:
        """Remove instances from the audit outbox."""
        if not sop_instance_uids:
            return
        sql = "DELETE FROM audit_outbox WHERE SOPInstanceUID IN (SELECT value FROM json_each(?))"
        await self._db.write(lambda c: c.execute(sql, (_dumps(list(sop_instance_uids)),)))

    async def studies_to_index(self, limit: int = 500) -> list[tuple[DicomJson, int]]:
        """Studies changed since last indexed, oldest change first, with their version; a removed
        study as its tombstone, with version 0."""
        changed = (
            f"SELECT changed_at, {_STUDY_COLUMNS}, version FROM studies"  # noqa: S608 - fixed text
            " WHERE version > indexed_version ORDER BY changed_at LIMIT ?"
        )
        removed = "SELECT changed_at, StudyInstanceUID FROM removed_studies ORDER BY changed_at LIMIT ?"

        def pending(c: sqlite3.Connection) -> list[tuple[float, DicomJson, int]]:
            studies = [(row[0], _result("study", row[1:-1]), row[-1]) for row in c.execute(changed, (limit,))]
            gone = [(at, _search.tombstone(uid), 0) for at, uid in c.execute(removed, (limit,))]
            return sorted([*studies, *gone], key=lambda item: item[0])[:limit]

        return [(study, version) for _, study, version in await self._db.read(pending)]

    async def mark_indexed(self, versions: Sequence[tuple[str, int]]) -> None:
        """Record the indexed version of studies that have not changed since (version 0: forget
        the tombstone of a removed study)."""
        sql = "UPDATE studies SET indexed_version = ? WHERE StudyInstanceUID = ? AND version = ?"
        params = [(version, uid, version) for uid, version in versions if version]
        removed = [(uid,) for uid, version in versions if not version]

        def mark(c: sqlite3.Connection) -> None:
            c.executemany(sql, params)
            c.executemany("DELETE FROM removed_studies WHERE StudyInstanceUID = ?", removed)

        if versions:
            await self._db.write(mark)

    async def iter_studies(self) -> AsyncIterator[DicomJson]:
        """Every study at study level, in Study Instance UID order, a page at a time."""
        sql = (
            f"SELECT {_STUDY_COLUMNS} FROM studies WHERE StudyInstanceUID > ?"  # noqa: S608
            " ORDER BY StudyInstanceUID LIMIT 500"
        )

        def page(after: str) -> Callable[[sqlite3.Connection], list[Any]]:
            return lambda c: c.execute(sql, (after,)).fetchall()

        after = ""
        while True:
            rows = await self._db.read(page(after))
            for row in rows:
                yield _result("study", row)
            if len(rows) < 500:
                return
            after = rows[-1][0]

    async def index_lag_seconds(self) -> float:
        """Age of the oldest change not yet indexed."""
        sql = (
            "SELECT MIN(changed_at) FROM (SELECT MIN(changed_at) AS changed_at FROM studies"
            " WHERE version > indexed_version UNION ALL SELECT MIN(changed_at) FROM removed_studies)"
        )
        oldest = (await self._db.read(lambda c: c.execute(sql).fetchone()))[0]
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)


def _put_instance(c: sqlite3.Connection, record: InstanceRecord, now: float) -> PutOutcome:
    existing = c.execute("SELECT sha256 FROM instances WHERE SOPInstanceUID = ?", (record.sop_instance_uid,))
    row = existing.fetchone()
    if row is not None:
        return PutOutcome.DUPLICATE if row[0] == record.sha256 else PutOutcome.CONFLICT
    attributes = record.attributes or derive(record.dataset)
    fields = _qido.level_fields(attributes, "instance")
    c.execute(
        f"INSERT INTO instances (SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, SeriesNumber,"  # noqa: S608
        f" {', '.join(fields)}, sop_class_uid, transfer_syntax_uid, sha256, size, source, received_at,"
        f" dataset, attributes) VALUES ({', '.join('?' * (len(fields) + 12))})",
        (
            record.sop_instance_uid, record.study_uid, record.series_uid, attributes.get("SeriesNumber"),
            *fields.values(), record.sop_class_uid, record.transfer_syntax_uid, record.sha256, record.size,
            record.source, record.received_at.isoformat(), _dumps(record.dataset), _dumps(attributes),
        ),
    )
    new_series = _add_to_series(c, record, attributes)
    _add_to_study(c, record, attributes, new_series, now)
    _add_to_burst(c, record)
    c.execute("INSERT OR REPLACE INTO audit_outbox VALUES (?, ?)", (record.sop_instance_uid, now))
    return PutOutcome.CREATED


def _add_to_series(c: sqlite3.Connection, record: InstanceRecord, attributes: dict[str, Any]) -> bool:
    counted = c.execute(
        "UPDATE series SET NumberOfSeriesRelatedInstances = NumberOfSeriesRelatedInstances + 1"
        " WHERE SeriesInstanceUID = ?",
        (record.series_uid,),
    )
    if counted.rowcount:
        return False
    fields = _qido.level_fields(attributes, "series")
    c.execute(
        f"INSERT INTO series (SeriesInstanceUID, StudyInstanceUID, {', '.join(fields)},"  # noqa: S608
        f" NumberOfSeriesRelatedInstances, representative, dataset)"
        f" VALUES ({', '.join('?' * (len(fields) + 5))})",
        (
            record.series_uid, record.study_uid, *fields.values(), 1, record.sop_instance_uid,
            _dumps(_qido.project(record.dataset, "series")),
        ),
    )
    return True


def _add_to_study(
    c: sqlite3.Connection, record: InstanceRecord, attributes: dict[str, Any], new_series: bool, now: float
) -> None:
    modality = attributes.get("Modality")
    row = c.execute(
        "SELECT modalities FROM studies WHERE StudyInstanceUID = ?", (record.study_uid,)
    ).fetchone()
    if row is None:
        fields = _qido.level_fields(attributes, "study")
        c.execute(
            f"INSERT INTO studies (StudyInstanceUID, {', '.join(fields)}, NumberOfStudyRelatedSeries,"  # noqa: S608
            " NumberOfStudyRelatedInstances, modalities, representative, dataset, burst,"
            " version, indexed_version, changed_at)"
            f" VALUES ({', '.join('?' * (len(fields) + 10))})",
            (
                record.study_uid, *fields.values(), 1, 1, _dumps([modality] if modality else []),
                record.sop_instance_uid, _dumps(_qido.project(record.dataset, "study")), 0, 1, 0, now,
            ),
        )
        c.execute("DELETE FROM removed_studies WHERE StudyInstanceUID = ?", (record.study_uid,))
        return
    modalities = set(json.loads(row[0]))
    if modality:
        modalities.add(modality)
    # SQLite evaluates every right-hand side on the row as it was before the update.
    c.execute(
        "UPDATE studies SET NumberOfStudyRelatedInstances = NumberOfStudyRelatedInstances + 1,"
        " NumberOfStudyRelatedSeries = NumberOfStudyRelatedSeries + ?, modalities = ?,"
        " changed_at = CASE WHEN version > indexed_version THEN changed_at ELSE ? END, version = version + 1"
        " WHERE StudyInstanceUID = ?",
        (int(new_series), _dumps(sorted(modalities)), now, record.study_uid),
    )


def _add_to_burst(c: sqlite3.Connection, record: InstanceRecord) -> None:
    """Count a created instance into its study's open burst; open the study's next burst if none is."""
    arrival = _epoch(record.received_at)
    row = c.execute(
        "SELECT burst, sources FROM assembly_outbox WHERE StudyInstanceUID = ? AND claimed_at IS NULL",
        (record.study_uid,),
    ).fetchone()
    if row is None:
        (burst,) = c.execute(
            "UPDATE studies SET burst = burst + 1 WHERE StudyInstanceUID = ? RETURNING burst",
            (record.study_uid,),
        ).fetchone()
        c.execute(
            "INSERT INTO assembly_outbox (StudyInstanceUID, burst, burst_instances, sources, last_arrival,"
            " boundary) VALUES (?, ?, 1, ?, ?, 0)",
            (record.study_uid, burst, _dumps([record.source]), arrival),
        )
        return
    c.execute(
        "UPDATE assembly_outbox SET burst_instances = burst_instances + 1, sources = ?, boundary = 0,"
        " boundary_at = NULL, last_arrival = MAX(last_arrival, ?) WHERE StudyInstanceUID = ? AND burst = ?",
        (_dumps(sorted({*json.loads(row[1]), record.source})), arrival, record.study_uid, row[0]),
    )


def _delete_instance(c: sqlite3.Connection, sop_instance_uid: str, now: float) -> None:
    row = c.execute(
        "SELECT StudyInstanceUID, SeriesInstanceUID FROM instances WHERE SOPInstanceUID = ?",
        (sop_instance_uid,),
    ).fetchone()
    if row is None:
        return
    study_uid, series_uid = row
    c.execute("DELETE FROM instances WHERE SOPInstanceUID = ?", (sop_instance_uid,))
    c.execute("DELETE FROM audit_outbox WHERE SOPInstanceUID = ?", (sop_instance_uid,))
    c.execute(
        "UPDATE series SET NumberOfSeriesRelatedInstances = NumberOfSeriesRelatedInstances - 1"
        " WHERE SeriesInstanceUID = ?",
        (series_uid,),
    )
    series_gone = c.execute(
        "DELETE FROM series WHERE SeriesInstanceUID = ? AND NumberOfSeriesRelatedInstances <= 0",
        (series_uid,),
    ).rowcount
    if not series_gone:
        _replace_representative(c, "series", series_uid, sop_instance_uid)
    study_gone = c.execute(
        "DELETE FROM studies WHERE StudyInstanceUID = ? AND NumberOfStudyRelatedInstances <= 1",
        (study_uid,),
    ).rowcount
    if study_gone:
        c.execute("INSERT OR IGNORE INTO removed_studies VALUES (?, ?)", (study_uid, now))
        c.execute("DELETE FROM assembly_outbox WHERE StudyInstanceUID = ?", (study_uid,))
        return
    modalities = [m for (m,) in c.execute(
        "SELECT DISTINCT Modality FROM series WHERE StudyInstanceUID = ? AND Modality IS NOT NULL",
        (study_uid,),
    )]
    c.execute(
        "UPDATE studies SET NumberOfStudyRelatedInstances = NumberOfStudyRelatedInstances - 1,"
        " NumberOfStudyRelatedSeries = NumberOfStudyRelatedSeries - ?, modalities = ?,"
        " changed_at = CASE WHEN version > indexed_version THEN changed_at ELSE ? END, version = version + 1"
        " WHERE StudyInstanceUID = ?",
        (series_gone, _dumps(sorted(modalities)), now, study_uid),
    )
    c.execute(
        "UPDATE assembly_outbox SET burst_instances = MAX(burst_instances - 1, 0)"
        " WHERE StudyInstanceUID = ? AND claimed_at IS NULL",
        (study_uid,),
    )
    _replace_representative(c, "study", study_uid, sop_instance_uid)


def _replace_representative(c: sqlite3.Connection, level: Level, uid: str, removed: str) -> None:
    """Let the earliest remaining instance answer for a series or study whose representative left."""
    table, key = _TABLE[level], UID_OF[level]
    current = c.execute(f"SELECT representative FROM {table} WHERE {key} = ?", (uid,)).fetchone()  # noqa: S608
    if current is None or current[0] != removed:
        return
    row = c.execute(
        f"SELECT SOPInstanceUID, dataset, attributes FROM instances WHERE {key} = ? ORDER BY seq LIMIT 1",  # noqa: S608
        (uid,),
    ).fetchone()
    fields = _qido.level_fields(json.loads(row[2]), level)
    assignments = ", ".join(f"{kw} = ?" for kw in fields)
    c.execute(
        f"UPDATE {table} SET representative = ?, dataset = ?, {assignments} WHERE {key} = ?",  # noqa: S608
        (row[0], _dumps(_qido.project(json.loads(row[1]), level)), *fields.values(), uid),
    )


def _claim_ready(
    c: sqlite3.Connection,
    now: float,
    limit: int,
    *,
    quiet_before: float,
    idle_before: float,
    expired_before: float,
) -> list[ReadyStudy]:
    rows = c.execute(
        "SELECT o.StudyInstanceUID, o.burst, o.burst_instances, s.NumberOfStudyRelatedInstances, s.PatientID,"
        " s.modalities, o.sources FROM assembly_outbox AS o JOIN studies AS s USING (StudyInstanceUID)"
        " WHERE ((o.boundary = 1 AND o.last_arrival < ?) OR o.last_arrival < ?)"
        " AND (o.claimed_at IS NULL OR o.claimed_at < ?) ORDER BY o.last_arrival LIMIT ?",
        (quiet_before, idle_before, expired_before, limit),
    ).fetchall()
    c.executemany(
        "UPDATE assembly_outbox SET claimed_at = ? WHERE StudyInstanceUID = ? AND burst = ?",
        [(now, row[0], row[1]) for row in rows],
    )
    return [
        ReadyStudy(
            study_uid=row[0], burst=row[1], burst_instances=row[2], total_instances=row[3], patient_id=row[4],
            modalities=tuple(json.loads(row[5])), sources=tuple(json.loads(row[6])),
        )
        for row in rows
    ]


def _move_assembly_state(c: sqlite3.Connection) -> None:
    """Move the open bursts of a file written before the assembly outbox into it (once)."""
    if "claimed" not in {row[1] for row in c.execute("PRAGMA table_info(studies)")}:
        return
    c.execute(
        "INSERT OR IGNORE INTO assembly_outbox (StudyInstanceUID, burst, burst_instances, sources,"
        " last_arrival, boundary, boundary_at) SELECT StudyInstanceUID, burst, burst_instances, sources,"
        " last_arrival, boundary, boundary_at FROM studies WHERE claimed = 0"
    )
    c.execute("DROP INDEX IF EXISTS studies_waiting")
    for column in ("burst_instances", "claimed", "boundary", "boundary_at", "last_arrival", "sources"):
        c.execute(f"ALTER TABLE studies DROP COLUMN {column}")


def _where(plan: Plan) -> tuple[str, list[Any]]:
    params: list[Any] = []
    clauses = []
    for level, conditions in plan.conditions.items():
        inner = " AND ".join(_condition_sql(level, condition, params) for condition in conditions)
        if level == plan.level:
            clauses.append(inner)
        else:
            key = _qido.link(plan.level, level)
            clauses.append(f"{key} IN (SELECT {key} FROM {_TABLE[level]} WHERE {inner})")  # noqa: S608
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _condition_sql(level: Level, condition: Condition, params: list[Any]) -> str:
    if level == "study" and condition.attribute == "ModalitiesInStudy":
        modality = Condition("Modality", condition.op, condition.value)
        inner = _condition_sql("series", modality, params)
        return f"StudyInstanceUID IN (SELECT StudyInstanceUID FROM series WHERE {inner})"  # noqa: S608
    column = condition.attribute  # a keyword from attributes.TAGS, never user text
    if condition.op == "in":
        values = list(condition.value)
        if len(values) > _MANY_PARAMETERS:
            params.append(_dumps(values))
            return f"{column} IN (SELECT value FROM json_each(?))"  # noqa: S608
        params.extend(values)
        return f"{column} IN ({', '.join('?' * len(values))})"
    if condition.op == "eq":
        params.append(condition.value)
        return f"{column} = ?"
    if condition.op == "wildcard":
        params.append(_qido.wildcard_to_glob(condition.value))
        return f"{column} GLOB ?"
    low, high = condition.value
    parts = []
    if low is not None:
        params.append(low)
        parts.append(f"{column} >= ?")
    if high is not None:
        params.append(high)
        parts.append(f"{column} <= ?")
    return " AND ".join(parts)


def _result(level: Level, row: Sequence[Any]) -> DicomJson:
    if level == "study":
        uid, dataset, modalities, series, instances = row
        return _qido.level_json("study", json.loads(dataset), {
            "StudyInstanceUID": uid, "ModalitiesInStudy": json.loads(modalities),
            "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": instances,
        })
    if level == "series":
        study_uid, series_uid, dataset, instances = row
        return _qido.level_json("series", json.loads(dataset), {
            "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
            "NumberOfSeriesRelatedInstances": instances,
        })
    study_uid, series_uid, sop_uid, dataset = row
    return _qido.level_json("instance", json.loads(dataset), {
        "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid,
    })


def _record(row: Sequence[Any]) -> InstanceRecord:
    return InstanceRecord(
        study_uid=row[0], series_uid=row[1], sop_instance_uid=row[2], sop_class_uid=row[3],
        transfer_syntax_uid=row[4], sha256=row[5], size=row[6], source=row[7],
        received_at=datetime.fromisoformat(row[8]), dataset=json.loads(row[9]),
        attributes=json.loads(row[10]),
    )


_SEARCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE
);
CREATE VIRTUAL TABLE IF NOT EXISTS study_text USING fts5 (
    patient_name, ids, descriptions, tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS name_words (
    word TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    PRIMARY KEY (word, study_uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS name_words_by_study ON name_words (study_uid);
-- A rebuild in progress (at most one: the lock) and the studies index_studies wrote meanwhile.
CREATE TABLE IF NOT EXISTS rebuilds (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    started REAL NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rebuild_writes (study_uid TEXT PRIMARY KEY) WITHOUT ROWID;
"""
_DROP_SEARCH = """
DROP TABLE IF EXISTS study_text;
DROP TABLE IF EXISTS name_words;
DROP TABLE IF EXISTS documents;
"""


class SqliteSearchIndex:
    """The search index in one SQLite file: FTS5 for free text, name words for fuzzy names.

    Fuzzy patient-name matching is computed in Python: the query and each indexed name are split
    into words (``^``, spaces and punctuation separate them, case folded); a study matches when
    every query word is close to some word of its name, in any order. A query word is close to a
    name word that starts with it or lies within Elasticsearch's ``AUTO`` edit distance (0 edits up
    to 2 letters, 1 up to 5, else 2; an adjacent swap is one edit). Candidates are the distinct
    indexed words of a plausible length, so the cost grows with the vocabulary of names, not with
    the number of studies. Phonetic matching is not used: Elasticsearch's integration build has no
    phonetic analysis, and both indexes should answer alike.
    """

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, _SEARCH_SCHEMA)

    async def start(self) -> None:
        """Open the file and create the tables if absent."""
        await self._db.start()

    async def close(self) -> None:
        """Stop the threads and close the connections."""
        await self._db.close()

    async def ping(self) -> bool:
        """True when the file answers a query."""
        return await self._db.ping()

    async def index_studies(self, studies: Sequence[DicomJson]) -> None:
        """Add or replace study documents, and drop those of tombstones, in one transaction."""
        documents, removed = [], []
        for study in studies:
            document = _search.study_document(study)
            if _search.is_tombstone(study):
                removed.append(document.study_uid)
            else:
                documents.append(document)
        if documents or removed:
            await self._db.write(lambda c: _index_documents(c, documents, removed))

    async def query_studies(self, query: Query) -> list[DicomJson] | None:
        """None: the SQLite metadata store answers structured queries itself, as fast."""
        return None

    async def fuzzy_patient_names(self, name: str, limit: int = 1000) -> list[str]:
        """Studies whose patient name is close to ``name`` (see the class docstring), closest first."""
        words = _search.name_tokens(name)
        if not words:
            return []
        return await self._db.read(lambda c: _fuzzy(c, words, limit))

    async def search(self, text: str, limit: int = 50, offset: int = 0) -> list[str]:
        """Studies matching every word of ``text`` (as a word prefix), best BM25 rank first."""
        words = _search.name_tokens(text)
        if not words:
            return []
        expression = " ".join(f'"{word}"*' for word in words)  # \w+ words hold no quote
        sql = (
            "SELECT documents.study_uid FROM study_text JOIN documents ON documents.id = study_text.rowid"
            " WHERE study_text MATCH ? ORDER BY rank, documents.study_uid LIMIT ? OFFSET ?"
        )
        rows = await self._db.read(lambda c: c.execute(sql, (expression, limit, offset)).fetchall())
        return [uid for (uid,) in rows]

    async def rebuild(self, studies: AsyncIterable[DicomJson]) -> int:
        """Replace every document by ``studies`` in one transaction (readers see the old index until
        it commits); the number of studies. Studies that ``index_studies`` wrote while ``studies``
        was read keep what it wrote: it read the store after this, or its newer change is still
        marked for the indexer. One rebuild at a time (``ReindexRunningError``)."""
        me = (socket.gethostname(), os.getpid())
        await self._db.write(lambda c: _start_rebuild(c, *me))
        try:
            documents = [
                _search.study_document(study) async for study in studies if not _search.is_tombstone(study)
            ]
            return await self._db.write(lambda c: _replace_documents(c, documents))
        finally:
            await self._db.write(lambda c: c.execute("DELETE FROM rebuilds WHERE host = ? AND pid = ?", me))

    async def reset(self) -> None:
        """Drop and recreate the index."""
        await self._db.script(_DROP_SEARCH + _SEARCH_SCHEMA)


def _start_rebuild(c: sqlite3.Connection, host: str, pid: int) -> None:
    """Take the rebuild lock, or refuse while a live process holds it (a dead one's is taken over)."""
    held = c.execute("SELECT started, host, pid FROM rebuilds").fetchone()
    if held is not None:
        started, holder, holder_pid = held
        if holder != host or _alive(holder_pid):
            when = datetime.fromtimestamp(started, tz=UTC).isoformat(timespec="seconds")
            raise ReindexRunningError(
                f"a reindex of the search index is already running (since {when}, process {holder_pid}"
                f" on {holder}); wait for it to finish"
            )
        log.warning("taking over the search index rebuild of process %d, which is gone", holder_pid)
    c.execute("DELETE FROM rebuilds")
    c.execute("DELETE FROM rebuild_writes")
    c.execute("INSERT INTO rebuilds (id, started, host, pid) VALUES (1, ?, ?, ?)", (time.time(), host, pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_documents(c: sqlite3.Connection, documents: Sequence[_search.StudyDocument]) -> int:
    """Every document replaced by ``documents``, except those index_studies wrote since the rebuild
    began (kept as written); ends the rebuild."""
    written = {uid for (uid,) in c.execute("SELECT study_uid FROM rebuild_writes")}
    stale = "SELECT id FROM documents WHERE study_uid NOT IN (SELECT study_uid FROM rebuild_writes)"
    c.execute(f"DELETE FROM study_text WHERE rowid IN ({stale})")  # noqa: S608 - fixed text
    c.execute("DELETE FROM name_words WHERE study_uid NOT IN (SELECT study_uid FROM rebuild_writes)")
    c.execute("DELETE FROM documents WHERE study_uid NOT IN (SELECT study_uid FROM rebuild_writes)")
    kept = [document for document in documents if document.study_uid not in written]
    _index_documents(c, kept, [])
    c.execute("DELETE FROM rebuild_writes")
    c.execute("DELETE FROM rebuilds")
    return len(documents)


def _index_documents(
    c: sqlite3.Connection,
    documents: Sequence[_search.StudyDocument],
    removed: Sequence[str],
) -> None:
    if c.execute("SELECT 1 FROM rebuilds").fetchone() is not None:  # a rebuild keeps these as written
        c.executemany(
            "INSERT OR IGNORE INTO rebuild_writes (study_uid) VALUES (?)",
            [(uid,) for uid in [*(document.study_uid for document in documents), *removed]],
        )
    for document in documents:
        _index_document(c, document)
    for study_uid in removed:
        found = c.execute("SELECT id FROM documents WHERE study_uid = ?", (study_uid,)).fetchone()
        if found is not None:
            c.execute("DELETE FROM study_text WHERE rowid = ?", found)
            c.execute("DELETE FROM documents WHERE id = ?", found)
        c.execute("DELETE FROM name_words WHERE study_uid = ?", (study_uid,))


def _index_document(c: sqlite3.Connection, document: _search.StudyDocument) -> None:
    c.execute("INSERT OR IGNORE INTO documents (study_uid) VALUES (?)", (document.study_uid,))
    (doc_id,) = c.execute("SELECT id FROM documents WHERE study_uid = ?", (document.study_uid,)).fetchone()
    c.execute("DELETE FROM study_text WHERE rowid = ?", (doc_id,))
    c.execute(
        "INSERT INTO study_text (rowid, patient_name, ids, descriptions) VALUES (?, ?, ?, ?)",
        (doc_id, " ".join(_search.name_tokens(document.patient_name)), document.ids, document.descriptions),
    )
    c.execute("DELETE FROM name_words WHERE study_uid = ?", (document.study_uid,))
    c.executemany(
        "INSERT OR IGNORE INTO name_words (word, study_uid) VALUES (?, ?)",
        [(word, document.study_uid) for word in _search.name_tokens(document.patient_name)],
    )


def _fuzzy(c: sqlite3.Connection, words: list[str], limit: int) -> list[str]:
    shortest = max(1, min(len(w) for w in words) - 2)
    vocabulary = [w for (w,) in c.execute(
        "SELECT DISTINCT word FROM name_words WHERE length(word) >= ?", (shortest,)
    )]
    distance: dict[str, int] = {}  # study -> summed edits over the query words
    for position, word in enumerate(words):
        allowed = _search.max_edits(word)
        close: dict[str, int] = {}
        for candidate in vocabulary:
            edits = 0 if candidate.startswith(word) else _search.edit_distance(word, candidate, allowed)
            if edits <= allowed:
                close[candidate] = edits
        found: dict[str, int] = {}
        for candidate, edits in close.items():
            for (study_uid,) in c.execute("SELECT study_uid FROM name_words WHERE word = ?", (candidate,)):
                found[study_uid] = min(edits, found.get(study_uid, edits))
        if position == 0:
            distance = found
        else:
            distance = {uid: edits + found[uid] for uid, edits in distance.items() if uid in found}
        if not distance:
            return []
    return sorted(distance, key=lambda uid: (distance[uid], uid))[:limit]
