"""The durable outbox of HTTP deliveries: results pushed to the hospital's FHIR server and
subscription notifications. A delivery is kept until the receiver takes it, so nothing is lost
while a receiver is down; it is retried with exponential backoff.

A delivery is claimed before it is sent (its next attempt moved a lease ahead by a compare-and-set),
so two FHIR processes never send the same one at once; a process that dies mid-send leaves it to be
claimed again when the lease ends. Receivers see at-least-once delivery: a push is a transaction of
PUTs with fixed ids, a notification carries its event number.

Adapters: SQLite (embedded) and MongoDB (``fhir_deliveries`` and ``fhir_delivery_claims``; the due
query scans on FerretDB, which is fine while few deliveries are kept: delivered ones keep only their
key and state).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import httpx
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from lucerna.core.storage.backing import Document, MongoBacked, SqliteBacked

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
PUSH = "push"
NOTIFICATION = "notification"


class DeliveryState(StrEnum):
    PENDING = "pending"  # waiting for its next attempt (or being sent)
    DEAD = "dead"  # refused by the receiver (4xx) or out of attempts; kept for an operator


@dataclass(frozen=True)
class Delivery:
    """One HTTP POST to make. ``key`` makes adding it idempotent (``push:<job id>``,
    ``notify:<subscription>:<report>/_history/<vid>``, ``handshake:<subscription>:<version>``);
    ``kind`` groups them (``push``, ``notification``, ``handshake``)."""

    key: str
    kind: str
    url: str
    body: bytes
    created_at: datetime
    next_attempt_at: datetime
    attempts: int = 0
    state: DeliveryState = DeliveryState.PENDING
    last_error: str = ""
    max_attempts: int = 0  # 0: retry until delivered
    headers: Mapping[str, str] = field(default_factory=dict)  # sent with it (a subscription's channel.header)


class DeliveryOutbox(Protocol):
    """Where deliveries wait."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def add(self, deliveries: Sequence[Delivery]) -> None:
        """Keep each delivery unless one with its key is kept (or was delivered) already."""
        ...

    async def claim(self, now: datetime, lease: timedelta, limit: int) -> list[Delivery]:
        """Pending deliveries due by ``now``, oldest first, each moved ``lease`` ahead so that no
        other process claims it meanwhile."""
        ...

    async def delivered(self, key: str) -> None:
        """The receiver took it: forget it (its key stays known, so it is never added again)."""
        ...

    async def retry_later(self, delivery: Delivery) -> None:
        """Store the delivery's new attempts, next attempt, state and last error."""
        ...

    async def outstanding(self, state: DeliveryState | None = None, limit: int = 100) -> list[Delivery]:
        """Deliveries not yet delivered, oldest first (for operators)."""
        ...


# --- Sending -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff: ``base * 2**(attempts - 1)`` seconds, at most ``cap``."""

    base: timedelta = timedelta(seconds=2)
    cap: timedelta = timedelta(minutes=5)
    lease: timedelta = timedelta(seconds=60)

    def delay(self, attempts: int) -> timedelta:
        """How long to wait after the ``attempts``-th failure."""
        delay: timedelta = min(self.cap, self.base * 2 ** max(0, attempts - 1))
        return delay


Headers = Callable[[Delivery], dict[str, str]]
# Told when a delivery is settled: (delivery, True) once taken, (delivery, False) once dead.
Settled = Callable[[Delivery, bool], Awaitable[None]]


async def _unheeded(_delivery: Delivery, _taken: bool) -> None:
    return None


class DeliveryWorker:
    """Claims due deliveries and POSTs them, in a loop until stopped.

    ``settled`` runs before the outbox records a delivery as taken or dead: if it fails, the
    delivery stays claimed, is sent again when its lease ends, and ``settled`` runs again.
    """

    def __init__(
        self,
        outbox: DeliveryOutbox,
        client: httpx.AsyncClient,
        *,
        policy: RetryPolicy | None = None,
        headers: Headers = lambda _delivery: {},
        settled: Settled = _unheeded,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        batch: int = 16,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.policy = policy or RetryPolicy()
        self.headers = headers
        self.settled = settled
        self.clock = clock
        self.batch = batch
        self.wake = asyncio.Event()

    async def run_once(self) -> int:
        """Send what is due now; how many were claimed."""
        claimed = await self.outbox.claim(self.clock(), self.policy.lease, self.batch)
        await asyncio.gather(*(self._send(delivery) for delivery in claimed))
        return len(claimed)

    async def run(self, interval: float, stopping: asyncio.Event) -> None:
        """Send due deliveries every ``interval`` seconds (sooner when ``wake`` is set) until
        ``stopping`` is set."""
        while not stopping.is_set():
            try:
                while await self.run_once() == self.batch:
                    pass
            except Exception:
                log.exception("delivering failed; retrying")
            self.wake.clear()
            waiters = [asyncio.ensure_future(e.wait()) for e in (self.wake, stopping)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED), interval)
            for waiter in waiters:
                waiter.cancel()

    async def _send(self, delivery: Delivery) -> None:
        attempts = delivery.attempts + 1
        try:
            response = await self.client.post(
                delivery.url,
                content=delivery.body,
                headers={
                    "Content-Type": FHIR_JSON,
                    "Accept": FHIR_JSON,
                    **delivery.headers,
                    **self.headers(delivery),
                },
            )
        except httpx.HTTPError as error:
            await self._failed(delivery, attempts, f"{type(error).__name__}: {error}", permanent=False)
            return
        if response.is_success:
            await self.settled(delivery, True)
            await self.outbox.delivered(delivery.key)
            status = response.status_code
            log.info("delivered", extra={"key": delivery.key, "status": status, "attempts": attempts})
            return
        # 4xx other than 408/429 is the receiver refusing this content: trying again cannot help.
        permanent = 400 <= response.status_code < 500 and response.status_code not in (408, 429)
        reason = f"HTTP {response.status_code}: {response.text[:500]}"
        await self._failed(delivery, attempts, reason, permanent=permanent)

    async def _failed(self, delivery: Delivery, attempts: int, reason: str, *, permanent: bool) -> None:
        exhausted = bool(delivery.max_attempts) and attempts >= delivery.max_attempts
        state = DeliveryState.DEAD if permanent or exhausted else DeliveryState.PENDING
        updated = replace(
            delivery,
            attempts=attempts,
            state=state,
            last_error=reason,
            next_attempt_at=self.clock() + self.policy.delay(attempts),
        )
        if state is DeliveryState.DEAD:
            await self.settled(updated, False)
        await self.outbox.retry_later(updated)
        log.warning(
            "delivery failed",
            extra={
                "key": delivery.key,
                "url": delivery.url,
                "attempts": attempts,
                "state": state,
                "error": reason,
            },
        )


# --- SQLite --------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB,                          -- NULL once delivered (the key is kept)
    created_at REAL NOT NULL,           -- epoch seconds
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    state TEXT NOT NULL,                -- pending | dead | delivered
    last_error TEXT NOT NULL,
    max_attempts INTEGER NOT NULL,
    headers TEXT NOT NULL               -- JSON object
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
"""

_DELIVERED = "delivered"
_INSERT = """
INSERT OR IGNORE INTO deliveries
    (key, kind, url, body, created_at, next_attempt_at, attempts, state, last_error, max_attempts, headers)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SELECT = """
SELECT key, kind, url, body, created_at, next_attempt_at, attempts, state, last_error, max_attempts, headers
FROM deliveries
"""


class SqliteDeliveryOutbox(SqliteBacked):
    """``DeliveryOutbox`` in a SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    async def add(self, deliveries: Sequence[Delivery]) -> None:
        """Insert each unless its key is taken."""
        rows = [_row(delivery) for delivery in deliveries]
        await self._db.write(lambda c: c.executemany(_INSERT, rows))

    async def claim(self, now: datetime, lease: timedelta, limit: int) -> list[Delivery]:
        """Due pending deliveries, moved ``lease`` ahead in the same transaction."""

        def work(connection: sqlite3.Connection) -> list[Delivery]:
            found = [
                _delivery(row)
                for row in connection.execute(
                    _SELECT + "WHERE state = 'pending' AND next_attempt_at <= ? "
                    "ORDER BY next_attempt_at, created_at LIMIT ?",
                    (now.timestamp(), limit),
                )
            ]
            connection.executemany(
                "UPDATE deliveries SET next_attempt_at = ? WHERE key = ?",
                [((now + lease).timestamp(), delivery.key) for delivery in found],
            )
            return found

        return await self._db.write(work)

    async def delivered(self, key: str) -> None:
        """Mark delivered and drop the body."""
        sql = "UPDATE deliveries SET state = ?, body = NULL WHERE key = ?"
        await self._db.write(lambda c: c.execute(sql, (_DELIVERED, key)))

    async def retry_later(self, delivery: Delivery) -> None:
        """Store the attempt's outcome."""
        await self._db.write(
            lambda c: c.execute(
                "UPDATE deliveries SET attempts = ?, next_attempt_at = ?, state = ?, last_error = ? "
                "WHERE key = ? AND state != ?",
                (
                    delivery.attempts,
                    delivery.next_attempt_at.timestamp(),
                    delivery.state.value,
                    delivery.last_error,
                    delivery.key,
                    _DELIVERED,
                ),
            )
        )

    async def outstanding(self, state: DeliveryState | None = None, limit: int = 100) -> list[Delivery]:
        """Pending and dead deliveries (or those of one state), oldest first."""
        states = [state.value] if state else [s.value for s in DeliveryState]
        pending, dead = (states * 2)[:2]  # one state given: both placeholders take it

        def work(connection: sqlite3.Connection) -> list[Delivery]:
            rows = connection.execute(
                _SELECT + "WHERE state IN (?, ?) ORDER BY created_at, key LIMIT ?", (pending, dead, limit)
            )
            return [_delivery(row) for row in rows]

        return await self._db.read(work)


def _row(delivery: Delivery) -> tuple[Any, ...]:
    return (
        delivery.key,
        delivery.kind,
        delivery.url,
        delivery.body,
        delivery.created_at.timestamp(),
        delivery.next_attempt_at.timestamp(),
        delivery.attempts,
        delivery.state.value,
        delivery.last_error,
        delivery.max_attempts,
        json.dumps(dict(delivery.headers)),
    )


def _delivery(row: Sequence[Any]) -> Delivery:
    key, kind, url, body, created, next_attempt, attempts, state, error, max_attempts, headers = row
    return Delivery(
        key=key,
        kind=kind,
        url=url,
        body=bytes(body),
        created_at=datetime.fromtimestamp(created, UTC),
        next_attempt_at=datetime.fromtimestamp(next_attempt, UTC),
        attempts=attempts,
        state=DeliveryState(state),
        last_error=error,
        max_attempts=max_attempts,
        headers=json.loads(headers),
    )


# --- MongoDB -------------------------------------------------------------------------------------


class MongoDeliveryOutbox(MongoBacked):
    """``DeliveryOutbox`` in MongoDB (``fhir_deliveries``, ``_id`` = key)."""

    @property
    def _deliveries(self) -> AsyncCollection[Document]:
        return self.collection("fhir_deliveries")

    async def start(self) -> None:
        """Connect, and index what the due query filters on (MongoDB uses it; FerretDB scans)."""
        await super().start()
        await self._deliveries.create_index([("state", ASCENDING), ("next_attempt_at", ASCENDING)])

    async def add(self, deliveries: Sequence[Delivery]) -> None:
        """Insert each unless its key is taken."""
        for delivery in deliveries:
            with contextlib.suppress(DuplicateKeyError):
                await self._deliveries.insert_one(_document(delivery))

    async def claim(self, now: datetime, lease: timedelta, limit: int) -> list[Delivery]:
        """Due pending deliveries, each taken under a claim document (see ``_take``)."""
        cursor = (
            self._deliveries.find({"state": DeliveryState.PENDING.value, "next_attempt_at": {"$lte": now}})
            .sort([("next_attempt_at", ASCENDING), ("created_at", ASCENDING)])
            .limit(limit)
        )
        due = [document async for document in cursor]
        return [_from_document(document) for document in due if await self._take(document, now, lease)]

    async def _take(self, document: dict[str, Any], now: datetime, lease: timedelta) -> bool:
        """Move the delivery's next attempt a lease ahead, if this process is the one to do it.

        FerretDB v1 does not apply a conditional update atomically (ADR 0007), but refuses a second
        insert of one ``_id``: the claim ``<key>@<next attempt>`` lets one process through, which
        then updates still filtered on the time it read; a later claimer's update no longer matches.
        A claim left by a process that died expires and is removed by the next one meeting it.
        """
        claims = self.collection("fhir_delivery_claims")
        claim = f"{document['_id']}@{document['next_attempt_at'].isoformat()}"
        try:
            await claims.insert_one({"_id": claim, "expires": now + lease})
        except DuplicateKeyError:
            await claims.delete_one({"_id": claim, "expires": {"$lt": now}})
            return False
        try:
            taken = await self._deliveries.update_one(
                {"_id": document["_id"], "next_attempt_at": document["next_attempt_at"]},
                {"$set": {"next_attempt_at": now + lease}},
            )
        finally:
            await claims.delete_one({"_id": claim})
        return bool(taken.modified_count)

    async def delivered(self, key: str) -> None:
        """Mark delivered and drop the body."""
        await self._deliveries.update_one({"_id": key}, {"$set": {"state": _DELIVERED, "body": None}})

    async def retry_later(self, delivery: Delivery) -> None:
        """Store the attempt's outcome."""
        await self._deliveries.update_one(
            {"_id": delivery.key, "state": {"$ne": _DELIVERED}},
            {
                "$set": {
                    "attempts": delivery.attempts,
                    "next_attempt_at": delivery.next_attempt_at,
                    "state": delivery.state.value,
                    "last_error": delivery.last_error,
                }
            },
        )

    async def outstanding(self, state: DeliveryState | None = None, limit: int = 100) -> list[Delivery]:
        """Pending and dead deliveries (or those of one state), oldest first."""
        states = [state.value] if state else [s.value for s in DeliveryState]
        cursor = (
            self._deliveries.find({"state": {"$in": states}})
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
        )
        return [_from_document(document) async for document in cursor]


def _document(delivery: Delivery) -> dict[str, Any]:
    return {
        "_id": delivery.key,
        "kind": delivery.kind,
        "url": delivery.url,
        "body": delivery.body,
        "created_at": delivery.created_at,
        "next_attempt_at": delivery.next_attempt_at,
        "attempts": delivery.attempts,
        "state": delivery.state.value,
        "last_error": delivery.last_error,
        "max_attempts": delivery.max_attempts,
        "headers": dict(delivery.headers),
    }


def _from_document(document: dict[str, Any]) -> Delivery:
    return Delivery(
        key=document["_id"],
        kind=document["kind"],
        url=document["url"],
        body=bytes(document["body"]),
        created_at=document["created_at"],
        next_attempt_at=document["next_attempt_at"],
        attempts=document["attempts"],
        state=DeliveryState(document["state"]),
        last_error=document["last_error"],
        max_attempts=document["max_attempts"],
        headers=document.get("headers") or {},
    )
