"""The embedded FHIR store and search index on SQLite: one file is both (``SqliteResources``).

It sits on the platform's ``SqliteDatabase`` (a writer thread, reader threads, WAL, busy timeout).
Store tables: ``fhir_versions`` (every version, the body as UTF-8 JSON, NULL for a deletion) and
``fhir_resources`` (which version of each resource is current). A ``write`` of several resources is
one ``BEGIN IMMEDIATE`` transaction: all or nothing.

Index tables (derived, rebuilt in one transaction): ``fhir_index`` (the newest indexed version of each
resource and whether it is findable, i.e. not a deletion), and its entries: ``fhir_index_terms``
(exact keys), ``fhir_index_strings`` (matched by prefix as a range ``[prefix, successor)`` so the
primary key serves it) and ``fhir_index_dates`` (each date parameter's [start, end) in epoch
microseconds: FHIR instants may carry them, and ``datetime.min``/``max`` stand for open periods).
A search selects keys from the entry tables and returns the indexed versions' bodies from
``fhir_versions``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lucerna.core.storage.backing import SqliteBacked
from lucerna.fhir.store import (
    Criterion,
    DateComparator,
    DateComparison,
    IndexEntries,
    PrefixCriterion,
    ResourceWrite,
    SearchPage,
    SearchQuery,
    StoredResource,
    TermCriterion,
    WriteOutcome,
)
from lucerna.fhir.versions import (
    EPOCH,
    MILLISECOND,
    body_with_meta,
    check_if_match,
    microseconds,
    milliseconds_ceiling,
    next_version,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fhir_versions (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,      -- epoch milliseconds, UTC
    sha256 TEXT NOT NULL,               -- '' for a deletion
    body BLOB,                          -- UTF-8 JSON with meta.versionId/lastUpdated; NULL: deletion
    UNIQUE (resource_type, id, version_id)
);
CREATE INDEX IF NOT EXISTS fhir_versions_by_time ON fhir_versions (resource_type, last_updated DESC);

CREATE TABLE IF NOT EXISTS fhir_resources (   -- the current version of each resource
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    PRIMARY KEY (resource_type, id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS fhir_index (
    key INTEGER PRIMARY KEY,
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id INTEGER NOT NULL,        -- the newest version indexed; older ones are ignored
    findable INTEGER NOT NULL,          -- 0: that version is a deletion
    UNIQUE (resource_type, id)
);
CREATE TABLE IF NOT EXISTS fhir_index_terms (
    resource_type TEXT NOT NULL,
    term TEXT NOT NULL,
    key INTEGER NOT NULL,
    PRIMARY KEY (resource_type, term, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fhir_index_terms_by_key ON fhir_index_terms (key);
CREATE TABLE IF NOT EXISTS fhir_index_strings (
    resource_type TEXT NOT NULL,
    value TEXT NOT NULL,
    key INTEGER NOT NULL,
    PRIMARY KEY (resource_type, value, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fhir_index_strings_by_key ON fhir_index_strings (key);
CREATE TABLE IF NOT EXISTS fhir_index_dates (
    resource_type TEXT NOT NULL,
    param TEXT NOT NULL,
    key INTEGER NOT NULL,
    start INTEGER NOT NULL,             -- epoch microseconds, UTC
    "end" INTEGER NOT NULL,
    PRIMARY KEY (key, param)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fhir_index_dates_by_start ON fhir_index_dates (resource_type, param, start);
CREATE INDEX IF NOT EXISTS fhir_index_dates_by_end ON fhir_index_dates (resource_type, param, "end");
"""
_CLEAR_INDEX = """
DELETE FROM fhir_index_terms;
DELETE FROM fhir_index_strings;
DELETE FROM fhir_index_dates;
DELETE FROM fhir_index;
"""
_VERSION_COLUMNS = "resource_type, id, version_id, last_updated, sha256, body"
_V_COLUMNS = ", ".join(f"v.{column}" for column in _VERSION_COLUMNS.split(", "))
_CURRENT = (
    f"SELECT {_V_COLUMNS} FROM fhir_resources AS r"  # noqa: S608 - fixed text
    " JOIN fhir_versions AS v USING (resource_type, id, version_id)"
)
_LAST_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)  # not encodable in UTF-8: the successor skips them


class SqliteResources(SqliteBacked):
    """``ResourceStore`` and ``ResourceIndex`` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    # --- ResourceStore -------------------------------------------------------------------------

    async def write(self, writes: Sequence[ResourceWrite]) -> list[WriteOutcome]:
        """Store each changed resource as a new version, all in one transaction (a conflict undoes
        the whole batch)."""
        if not writes:
            return []
        return await self._db.write(lambda c: [_write(c, w, datetime.now(UTC)) for w in writes])

    async def delete(
        self, resource_type: str, id: str, *, if_match: int | None = None
    ) -> StoredResource | None:
        """Record a deletion as the next version; None when unknown or already deleted."""
        return await self._db.write(lambda c: _delete(c, resource_type, id, if_match, datetime.now(UTC)))

    async def load(self, resources: Sequence[StoredResource]) -> int:
        """Insert new resources as they are, in one transaction."""

        def work(c: sqlite3.Connection) -> int:
            loaded = 0
            for stored in resources:
                if _current(c, stored.resource_type, stored.id) is None:
                    _insert_version(c, stored)
                    loaded += 1
            return loaded

        return await self._db.write(work)

    async def read(self, resource_type: str, id: str) -> StoredResource | None:
        """The current version (a deletion included), or None."""
        return await self._db.read(lambda c: _current(c, resource_type, id))

    async def read_many(self, references: Sequence[str]) -> list[StoredResource]:
        """Current, not deleted versions of ``references`` in the order asked."""

        def work(c: sqlite3.Connection) -> list[StoredResource]:
            found = []
            for reference in references:
                resource_type, _, id = reference.partition("/")
                stored = _current(c, resource_type, id)
                if stored is not None and not stored.deleted:
                    found.append(stored)
            return found

        return await self._db.read(work) if references else []

    async def vread(self, resource_type: str, id: str, version_id: int) -> StoredResource | None:
        """One version, or None."""
        sql = (
            f"SELECT {_VERSION_COLUMNS} FROM fhir_versions"  # noqa: S608 - fixed text
            " WHERE resource_type = ? AND id = ? AND version_id = ?"
        )
        row = await self._db.read(lambda c: c.execute(sql, (resource_type, id, version_id)).fetchone())
        return None if row is None else _stored(row)

    async def history(
        self,
        resource_type: str,
        id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = 20,
        offset: int = 0,
    ) -> tuple[list[StoredResource], int]:
        """Versions newest first (``last_updated``, then type, id, version), a page and the total."""
        clauses: list[str] = ["resource_type = ?"]
        parameters: list[Any] = [resource_type]
        if id is not None:
            clauses.append("id = ?")
            parameters.append(id)
        if since is not None:
            clauses.append("last_updated >= ?")
            parameters.append(_milliseconds(milliseconds_ceiling(since)))
        where = " AND ".join(clauses)
        page_sql = (
            f"SELECT {_VERSION_COLUMNS} FROM fhir_versions WHERE {where}"  # noqa: S608 - fixed clauses
            " ORDER BY last_updated DESC, id, version_id DESC LIMIT ? OFFSET ?"
        )
        total_sql = f"SELECT COUNT(*) FROM fhir_versions WHERE {where}"  # noqa: S608 - fixed clauses

        def work(c: sqlite3.Connection) -> tuple[list[StoredResource], int]:
            rows = c.execute(page_sql, (*parameters, count, offset)).fetchall() if count > 0 else []
            return [_stored(row) for row in rows], c.execute(total_sql, parameters).fetchone()[0]

        return await self._db.read(work)

    async def iterate_current(
        self, resource_type: str, batch: int = 500
    ) -> AsyncIterator[list[StoredResource]]:
        """Every current version of a type, ``batch`` at a time, in id order."""
        sql = f"{_CURRENT} WHERE r.resource_type = ? AND r.id > ? ORDER BY r.id LIMIT ?"
        after = ""
        while True:
            parameters = (resource_type, after, batch)
            rows = await self._db.read(lambda c: c.execute(sql, parameters).fetchall())  # noqa: B023 - awaited at once
            if not rows:
                return
            yield [_stored(row) for row in rows]
            after = rows[-1][1]

    # --- ResourceIndex -------------------------------------------------------------------------

    async def index(self, items: Sequence[tuple[StoredResource, IndexEntries]]) -> None:
        """Replace each resource's entries unless a version as new or newer is indexed."""
        if items:
            await self._db.write(lambda c: _index_all(c, items))

    async def search(self, query: SearchQuery) -> SearchPage:
        """The matching indexed versions, a page of them and (if asked) how many in all."""
        where, parameters = _where(query)
        joins, order = _order(query)
        page_sql = (
            f"SELECT {_V_COLUMNS} FROM fhir_index AS d"  # noqa: S608 - built from fixed text
            f" {' '.join(joins)} JOIN fhir_versions AS v"
            " ON v.resource_type = d.resource_type AND v.id = d.id AND v.version_id = d.version_id"
            f" WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?"
        )
        total_sql = f"SELECT COUNT(*) FROM fhir_index AS d WHERE {where}"  # noqa: S608 - built from fixed text

        def work(c: sqlite3.Connection) -> SearchPage:
            rows = []
            if query.count > 0:
                sort_parameters = [key.param for key in query.sort if key.param != "_id"]
                rows = c.execute(
                    page_sql, (*sort_parameters, *parameters, query.count, query.offset)
                ).fetchall()
            total = c.execute(total_sql, parameters).fetchone()[0] if query.with_total else None
            return SearchPage([_stored(row) for row in rows], total)

        return await self._db.read(work)

    async def rebuild(self, items: AsyncIterable[Sequence[tuple[StoredResource, IndexEntries]]]) -> int:
        """Re-index ``items`` and drop the entries of resources the store does not hold, in one
        transaction: searches see the old index until it commits. A version that ``index`` wrote
        meanwhile is kept when newer than the one read here; one as new is indexed again from
        ``items`` (so new entries of an unchanged version replace old ones). The write transaction
        serialises rebuilds: a second one only repeats the work."""
        collected = [item async for batch in items for item in batch]
        return await self._db.write(lambda c: _rebuild_index(c, collected))

    async def clear(self) -> None:
        """Forget every index entry (the store's tables stay)."""
        await self._db.script(_CLEAR_INDEX)


# --- Store ---------------------------------------------------------------------------------------


def _current(c: sqlite3.Connection, resource_type: str, id: str) -> StoredResource | None:
    row = c.execute(f"{_CURRENT} WHERE r.resource_type = ? AND r.id = ?", (resource_type, id)).fetchone()
    return None if row is None else _stored(row)


def _write(c: sqlite3.Connection, write: ResourceWrite, now: datetime) -> WriteOutcome:
    current = _current(c, write.resource_type, write.id)
    check_if_match(write.resource_type, write.id, write.if_match, current)
    if current is not None and not current.deleted and current.sha256 == write.sha256:
        return WriteOutcome(current, changed=False)
    version_id, last_updated = next_version(current, now)
    body = body_with_meta(write.resource, version_id, last_updated)
    stored = StoredResource(write.resource_type, write.id, version_id, last_updated, write.sha256, body)
    _insert_version(c, stored)
    return WriteOutcome(stored, changed=True)


def _delete(
    c: sqlite3.Connection, resource_type: str, id: str, if_match: int | None, now: datetime
) -> StoredResource | None:
    current = _current(c, resource_type, id)
    if current is None or current.deleted:
        return None
    check_if_match(resource_type, id, if_match, current)
    version_id, last_updated = next_version(current, now)
    stored = StoredResource(resource_type, id, version_id, last_updated, "", None)
    _insert_version(c, stored)
    return stored


def _insert_version(c: sqlite3.Connection, stored: StoredResource) -> None:
    c.execute(
        f"INSERT INTO fhir_versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608 - fixed text
        (
            stored.resource_type,
            stored.id,
            stored.version_id,
            _milliseconds(stored.last_updated),
            stored.sha256,
            stored.body,
        ),
    )
    c.execute(
        "INSERT INTO fhir_resources VALUES (?, ?, ?)"
        " ON CONFLICT (resource_type, id) DO UPDATE SET version_id = excluded.version_id",
        (stored.resource_type, stored.id, stored.version_id),
    )


def _stored(row: Sequence[Any]) -> StoredResource:
    resource_type, id, version_id, last_updated, sha256, body = row
    moment = EPOCH + last_updated * MILLISECOND
    return StoredResource(resource_type, id, version_id, moment, sha256, body)


def _milliseconds(moment: datetime) -> int:
    return (moment - EPOCH) // MILLISECOND


# --- Index ---------------------------------------------------------------------------------------


def _index_all(c: sqlite3.Connection, items: Sequence[tuple[StoredResource, IndexEntries]]) -> None:
    for stored, entries in items:
        _index(c, stored, entries)


def _rebuild_index(c: sqlite3.Connection, items: Sequence[tuple[StoredResource, IndexEntries]]) -> int:
    gone = (
        "SELECT key FROM fhir_index AS i WHERE NOT EXISTS (SELECT 1 FROM fhir_resources AS r"
        " WHERE r.resource_type = i.resource_type AND r.id = i.id)"
    )
    for table in ("fhir_index_terms", "fhir_index_strings", "fhir_index_dates", "fhir_index"):
        c.execute(f"DELETE FROM {table} WHERE key IN ({gone})")  # noqa: S608 - fixed names
    for stored, entries in items:
        _index(c, stored, entries, again=True)
    return len(items)


def _index(
    c: sqlite3.Connection, stored: StoredResource, entries: IndexEntries, *, again: bool = False
) -> None:
    """Index this version unless it or a newer one is (``again``: unless a newer one is)."""
    row = c.execute(
        "SELECT key, version_id FROM fhir_index WHERE resource_type = ? AND id = ?",
        (stored.resource_type, stored.id),
    ).fetchone()
    if row is not None and (row[1] > stored.version_id or (row[1] == stored.version_id and not again)):
        return
    if row is None:
        key = c.execute(
            "INSERT INTO fhir_index (resource_type, id, version_id, findable) VALUES (?, ?, ?, ?)",
            (stored.resource_type, stored.id, stored.version_id, int(not stored.deleted)),
        ).lastrowid
    else:
        key = row[0]
        c.execute(
            "UPDATE fhir_index SET version_id = ?, findable = ? WHERE key = ?",
            (stored.version_id, int(not stored.deleted), key),
        )
        for table in ("fhir_index_terms", "fhir_index_strings", "fhir_index_dates"):
            c.execute(f"DELETE FROM {table} WHERE key = ?", (key,))  # noqa: S608 - fixed names
    if stored.deleted:
        return
    kind = stored.resource_type
    c.executemany("INSERT INTO fhir_index_terms VALUES (?, ?, ?)", [(kind, t, key) for t in entries.terms])
    c.executemany(
        "INSERT INTO fhir_index_strings VALUES (?, ?, ?)", [(kind, s, key) for s in entries.strings]
    )
    c.executemany(
        "INSERT INTO fhir_index_dates VALUES (?, ?, ?, ?, ?)",
        [
            (kind, param, key, microseconds(start), microseconds(end))
            for param, (start, end) in entries.dates.items()
        ],
    )


def _where(query: SearchQuery) -> tuple[str, list[Any]]:
    clauses = ["d.resource_type = ?", "d.findable = 1"]
    parameters: list[Any] = [query.resource_type]
    for criterion in query.criteria:
        clauses.append(_criterion_sql(query.resource_type, criterion, parameters))
    return " AND ".join(clauses), parameters


def _criterion_sql(resource_type: str, criterion: Criterion, parameters: list[Any]) -> str:
    """One criterion as a condition on ``d.key``, its parameters appended to ``parameters``."""
    if isinstance(criterion, TermCriterion):
        if not criterion.terms:
            return "1" if criterion.negate else "0"
        parameters += [resource_type, *criterion.terms]
        marks = ", ".join("?" * len(criterion.terms))
        keys = f"SELECT key FROM fhir_index_terms WHERE resource_type = ? AND term IN ({marks})"  # noqa: S608
        return f"d.key {'NOT IN' if criterion.negate else 'IN'} ({keys})"
    if isinstance(criterion, PrefixCriterion):
        rows = "fhir_index_strings WHERE resource_type = ?"
        head = [resource_type]
        alternatives = [_prefix_sql(prefix) for prefix in criterion.prefixes]
    else:
        rows = "fhir_index_dates WHERE resource_type = ? AND param = ?"
        head = [resource_type, criterion.param]
        alternatives = [_comparison_sql(comparison) for comparison in criterion.comparisons]
    if not alternatives:
        return "0"
    parameters += head
    for _, bounds in alternatives:
        parameters += bounds
    conditions = " OR ".join(condition for condition, _ in alternatives)
    return f"d.key IN (SELECT key FROM {rows} AND ({conditions}))"  # noqa: S608 - built from fixed text


def _prefix_sql(prefix: str) -> tuple[str, list[Any]]:
    """Strings starting with ``prefix`` as a range on ``value``, which the primary key serves."""
    successor = prefix_successor(prefix)
    if successor is None:
        return "value >= ?", [prefix]
    return "(value >= ? AND value < ?)", [prefix, successor]


# ``search.date_matches`` in SQL: each comparator's condition on the columns ``start`` and ``end``,
# and which of the value's bounds fill its parameters.
_DATE_SQL: dict[DateComparator, tuple[str, tuple[str, ...]]] = {
    DateComparator.EQ: ('(start >= ? AND "end" <= ?)', ("start", "end")),
    DateComparator.NE: ('NOT (start >= ? AND "end" <= ?)', ("start", "end")),
    DateComparator.GT: ('"end" > ?', ("end",)),
    DateComparator.LT: ("start < ?", ("start",)),
    DateComparator.GE: ('"end" > ?', ("start",)),
    DateComparator.LE: ("start < ?", ("end",)),
    DateComparator.SA: ("start >= ?", ("end",)),
    DateComparator.EB: ('"end" <= ?', ("start",)),
}


def _comparison_sql(comparison: DateComparison) -> tuple[str, list[Any]]:
    sql, bounds = _DATE_SQL[comparison.comparator]
    return sql, [microseconds(getattr(comparison, bound)) for bound in bounds]


def prefix_successor(prefix: str) -> str | None:
    """The least string above every string starting with ``prefix`` (code-point order, which is
    SQLite's byte order on UTF-8); None when there is none (every string from ``prefix`` on)."""
    stem = prefix.rstrip(chr(_LAST_CODE_POINT))
    if not stem:
        return None
    following = ord(stem[-1]) + 1
    if following in _SURROGATES:
        following = _SURROGATES.stop
    return stem[:-1] + chr(following)


def _order(query: SearchQuery) -> tuple[list[str], str]:
    """Joins for the sort keys (their parameters come first) and the ORDER BY clause."""
    joins, terms = [], []
    for number, key in enumerate(query.sort):
        direction = "DESC" if key.descending else "ASC"
        if key.param == "_id":
            terms.append(f"d.id {direction}")
            continue
        alias = f"s{number}"
        joins.append(f"LEFT JOIN fhir_index_dates AS {alias} ON {alias}.key = d.key AND {alias}.param = ?")
        terms += [f"{alias}.start IS NULL", f"{alias}.start {direction}"]
    terms.append("d.id")
    return joins, ", ".join(terms)
