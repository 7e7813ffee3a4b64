"""The event numbers of Subscriptions: each Subscription counts its events 1, 2, 3... and a
notification carries its number, so a receiver can tell a missed event from a repeated one.

An event (a report version, ``<report>/_history/<vid>``) keeps the number it got first, so a
redelivered ``fhir.report-published`` numbers nothing anew. Numbers are taken by inserting a row
whose key is ``(subscription, number)``: of two FHIR processes numbering at once, one insert wins
and the other takes the next number. That holds on FerretDB v1, which does not apply a conditional
update atomically but refuses a second insert of one ``_id`` (ADR 0007); a counter document bumped
by ``$inc``/compare-and-set would not.

Adapters: SQLite (a table beside the outbox, one write transaction per number) and MongoDB
(``fhir_subscription_events``: ``_id`` = ``<subscription>#<number>`` per number taken,
``<subscription>@<event>`` per event numbered and ``<subscription>#latest``, a hint where to start;
lookups by ``_id`` only, which FerretDB answers from its index).
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from lucerna.core.storage.backing import Document, MongoBacked, SqliteBacked

MAX_TRIES = 100  # numbers tried before giving up: only as many processes as race for one can be ahead


class EventNumbers(Protocol):
    """Where each Subscription's events are numbered."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def number(self, subscription: str, event: str) -> int:
        """The number of ``event`` for ``subscription``: the one it has, else the next one free."""
        ...

    async def count(self, subscription: str) -> int:
        """How many events ``subscription`` has had (its highest number; 0 for none)."""
        ...


# --- SQLite --------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscription_events (
    subscription TEXT NOT NULL,
    number INTEGER NOT NULL,
    event TEXT NOT NULL,                -- <report>/_history/<vid>
    at REAL NOT NULL,                   -- epoch seconds
    PRIMARY KEY (subscription, number),
    UNIQUE (subscription, event)
);
"""


class SqliteEventNumbers(SqliteBacked):
    """``EventNumbers`` in a SQLite file (the write transaction makes find-or-take atomic)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    async def number(self, subscription: str, event: str) -> int:
        """Find the event's number or take the next, in one transaction."""
        now = datetime.now(UTC).timestamp()

        def work(connection: sqlite3.Connection) -> int:
            found = connection.execute(
                "SELECT number FROM subscription_events WHERE subscription = ? AND event = ?",
                (subscription, event),
            ).fetchone()
            if found is not None:
                return int(found[0])
            (latest,) = connection.execute(
                "SELECT COALESCE(MAX(number), 0) FROM subscription_events WHERE subscription = ?",
                (subscription,),
            ).fetchone()
            connection.execute(
                "INSERT INTO subscription_events (subscription, number, event, at) VALUES (?, ?, ?, ?)",
                (subscription, latest + 1, event, now),
            )
            return int(latest) + 1

        return await self._db.write(work)

    async def count(self, subscription: str) -> int:
        """The highest number taken."""
        sql = "SELECT COALESCE(MAX(number), 0) FROM subscription_events WHERE subscription = ?"
        return await self._db.read(lambda c: int(c.execute(sql, (subscription,)).fetchone()[0]))


# --- MongoDB -------------------------------------------------------------------------------------


class MongoEventNumbers(MongoBacked):
    """``EventNumbers`` in MongoDB (``fhir_subscription_events``)."""

    @property
    def _events(self) -> AsyncCollection[Document]:
        return self.collection("fhir_subscription_events")

    async def number(self, subscription: str, event: str) -> int:
        """The event's number (``<subscription>@<event>``), else the next free
        ``<subscription>#<number>`` after the latest known one, taken by insert.

        Two processes numbering the same event at the same moment (a redelivery racing the first
        delivery) can each take a number; the outbox keeps one notification per event, so the
        other number is a gap the receiver sees, never a duplicate."""
        found = await self._events.find_one({"_id": f"{subscription}@{event}"})
        if found is not None:
            return int(found["number"])
        number = await self._latest(subscription) + 1
        for _ in range(MAX_TRIES):
            try:
                await self._events.insert_one(
                    {"_id": f"{subscription}#{number}", "event": event, "at": datetime.now(UTC)}
                )
            except DuplicateKeyError:
                number += 1
                continue
            with contextlib.suppress(DuplicateKeyError):
                await self._events.insert_one({"_id": f"{subscription}@{event}", "number": number})
            with contextlib.suppress(DuplicateKeyError):  # two first upserts at once: one wins
                await self._events.update_one(
                    {"_id": f"{subscription}#latest"}, {"$max": {"number": number}}, upsert=True
                )
            return number
        raise RuntimeError(f"no free event number for {subscription} after {MAX_TRIES} tries")

    async def count(self, subscription: str) -> int:
        """The highest number taken: the latest known, then the taken ones after it."""
        number = await self._latest(subscription)
        while await self._events.find_one({"_id": f"{subscription}#{number + 1}"}, {"_id": 1}) is not None:
            number += 1
        return number

    async def _latest(self, subscription: str) -> int:
        # A hint only (FerretDB does not apply $max atomically): numbers are taken by insert.
        latest = await self._events.find_one({"_id": f"{subscription}#latest"})
        return int(latest["number"]) if latest is not None else 0
