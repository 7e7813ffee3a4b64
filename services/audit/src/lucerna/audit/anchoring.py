"""Continuous anchoring: every signed checkpoint goes onto the Fabric ledger through the anchor
service (``services/anchor``, gRPC ``lucerna.anchoring.v1``), and where it landed is recorded.

The ``Anchorer`` wakes when a checkpoint is signed and anchors the newest one, with the consistency
proof from the size last anchored; the chaincode accepts it only if it extends that one (ADR 0016).
Checkpoints signed while a transaction was in flight are covered by the next, larger one: the
ledger holds a chain of consistent checkpoints, not necessarily every one. Each anchor (transaction
id, block number, commit time, the note as stored on the ledger) is kept in an ``AnchorStore`` beside
the log, one per tree size, so an auditor can go from an entry to the anchored checkpoint that
covers it (``covering``) and read it back from the ledger.

Several processes may serve one log (``lucerna serve`` runs workers; replicas share MongoDB): one
of them anchors at a time, under a lease in the ``AnchorStore`` (renewed while it works, taken over
once it lapses); the others only poll, so they never race each other's transactions.

The chaincode accepts only checkpoints signed by a key registered for the origin: every key is
registered on start, and a checkpoint signed by a key not registered yet (a rotation while running:
``keys.Keyring.refresh``) has its key registered before it is anchored.

On start, the ledger's latest anchor of the origin is read back: a crash between a commit and its
record loses nothing, and a ledger holding a root that is not the log's is reported loudly (the log
or the ledger was rewritten) and never anchored over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import grpc
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from lucerna.anchoring.v1 import anchoring_pb2, anchoring_pb2_grpc
from lucerna.audit.checkpoints import SignedCheckpoint
from lucerna.audit.keys import Keyring
from lucerna.audit.log import AuditLog
from lucerna.core.storage.backing import Document, MongoBacked, SqliteBacked

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
CALL_TIMEOUT_SECONDS = 60.0
LEASE_SECONDS = 10.0
# Checkpoints signed by another process of the log do not wake this one: look for them this often.
POLL_SECONDS = 1.0


class AnchorError(Exception):
    """The anchor service or the ledger could not be reached; worth retrying."""


class AnchorRefusedError(AnchorError):
    """The ledger refused the request (a checkpoint that does not extend the anchored one, an
    unregistered key...): retrying the same request cannot succeed."""


@dataclass(frozen=True)
class Anchor:
    """A checkpoint as anchored: the signed note the ledger holds and where it landed."""

    size: int
    root: bytes
    note: str
    transaction_id: str
    block_number: int
    committed_at: datetime
    channel: str
    chaincode: str

    @classmethod
    def from_proto(cls, anchored: anchoring_pb2.Anchored) -> Anchor:
        """From the anchor service's answer."""
        return cls(
            size=anchored.tree_size,
            root=anchored.root_hash,
            note=anchored.checkpoint,
            transaction_id=anchored.transaction_id,
            block_number=anchored.block_number,
            committed_at=anchored.committed_at.ToDatetime(tzinfo=UTC),
            channel=anchored.channel,
            chaincode=anchored.chaincode,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form of the auditors' API and of proof bundles."""
        return {
            "size": self.size,
            "root": self.root.hex(),
            "checkpoint": self.note,
            "transaction_id": self.transaction_id,
            "block_number": self.block_number,
            "committed_at": self.committed_at.isoformat(),
            "channel": self.channel,
            "chaincode": self.chaincode,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Anchor:
        """The inverse of ``to_json``."""
        return cls(
            size=int(data["size"]),
            root=bytes.fromhex(data["root"]),
            note=str(data["checkpoint"]),
            transaction_id=str(data["transaction_id"]),
            block_number=int(data["block_number"]),
            committed_at=datetime.fromisoformat(data["committed_at"]),
            channel=str(data["channel"]),
            chaincode=str(data["chaincode"]),
        )


class Ledger(Protocol):
    """The anchor service, as the audit service uses it."""

    async def register_key(self, origin: str, key_name: str, public_key: bytes) -> None: ...

    async def anchor(self, origin: str, note: str, consistency_proof: Sequence[bytes]) -> Anchor: ...

    async def latest(self, origin: str) -> Anchor | None: ...

    async def by_size(self, origin: str, size: int) -> Anchor | None: ...

    async def close(self) -> None: ...


class GrpcLedger:
    """The anchor service over gRPC, with its bearer token when one is configured."""

    def __init__(self, target: str, token: str | None = None) -> None:
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = anchoring_pb2_grpc.AnchorsStub(self._channel)  # type: ignore[no-untyped-call]

    async def register_key(self, origin: str, key_name: str, public_key: bytes) -> None:
        """Register a public key of the log (idempotent)."""
        request = anchoring_pb2.RegisterLogKeyRequest(origin=origin, key_name=key_name, public_key=public_key)
        await self._call(self._stub.RegisterLogKey, request, f"registering key {key_name}")

    async def anchor(self, origin: str, note: str, consistency_proof: Sequence[bytes]) -> Anchor:
        """Anchor a signed checkpoint; returns once its transaction committed valid."""
        request = anchoring_pb2.AnchorRequest(
            origin=origin, checkpoint=note, consistency_proof=list(consistency_proof)
        )
        answer = await self._call(self._stub.Anchor, request, "anchoring a checkpoint")
        return Anchor.from_proto(answer)

    async def latest(self, origin: str) -> Anchor | None:
        """The ledger's latest anchor of ``origin``, or None."""
        request = anchoring_pb2.LatestRequest(origin=origin)
        answer = await self._call(self._stub.Latest, request, "reading the latest anchor", missing_ok=True)
        return None if answer is None else Anchor.from_proto(answer)

    async def by_size(self, origin: str, size: int) -> Anchor | None:
        """The ledger's anchor of ``origin`` at ``size``, or None."""
        request = anchoring_pb2.BySizeRequest(origin=origin, tree_size=size)
        what = f"reading the anchor of size {size}"
        answer = await self._call(self._stub.BySize, request, what, missing_ok=True)
        return None if answer is None else Anchor.from_proto(answer)

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self._channel.close()

    async def _call(self, method: Any, request: Any, what: str, *, missing_ok: bool = False) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if missing_ok and code == grpc.StatusCode.NOT_FOUND:
                return None
            message = f"{what} at {self.target}: {code.name}: {error.details()}"
            if code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.UNAUTHENTICATED,
            ):
                raise AnchorRefusedError(message) from None
            raise AnchorError(message) from None


class AnchorStore(Protocol):
    """Where each anchored checkpoint landed, one per tree size."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def add(self, anchor: Anchor) -> None:
        """Keep it (a second anchor of the same size is ignored: the ledger has one per size)."""
        ...

    async def at(self, size: int) -> Anchor | None: ...

    async def latest(self) -> Anchor | None: ...

    async def covering(self, size: int) -> Anchor | None:
        """The smallest anchored checkpoint of at least ``size`` entries, or None."""
        ...

    async def lead(self, owner: str, seconds: float) -> bool:
        """Take or renew the anchoring lease for ``seconds``; whether ``owner`` holds it."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS anchors (
    size INTEGER PRIMARY KEY,
    anchor TEXT NOT NULL,          -- Anchor.to_json()
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS anchoring_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL,
    expires REAL NOT NULL          -- epoch seconds
);
"""


class SqliteAnchorStore(SqliteBacked):
    """The ``AnchorStore`` in a SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    async def add(self, anchor: Anchor) -> None:
        """Keep it unless its size is kept."""
        row = (anchor.size, _dumps(anchor), time.time())
        await self._db.write(lambda c: c.execute("INSERT OR IGNORE INTO anchors VALUES (?, ?, ?)", row))

    async def at(self, size: int) -> Anchor | None:
        """The anchor of exactly ``size`` entries."""
        return await self._one("SELECT anchor FROM anchors WHERE size = ?", (size,))

    async def latest(self) -> Anchor | None:
        """The anchor of the largest size."""
        return await self._one("SELECT anchor FROM anchors ORDER BY size DESC LIMIT 1", ())

    async def covering(self, size: int) -> Anchor | None:
        """See ``AnchorStore.covering``."""
        return await self._one("SELECT anchor FROM anchors WHERE size >= ? ORDER BY size LIMIT 1", (size,))

    async def lead(self, owner: str, seconds: float) -> bool:
        """See ``AnchorStore.lead``: one conditional upsert in the writer's transaction."""
        sql = (
            "INSERT INTO anchoring_lease VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "owner = excluded.owner, expires = excluded.expires "
            "WHERE anchoring_lease.owner = excluded.owner OR anchoring_lease.expires < ?"
        )

        def work(c: sqlite3.Connection) -> bool:
            now = time.time()
            c.execute(sql, (owner, now + seconds, now))
            return bool(c.execute("SELECT owner = ? FROM anchoring_lease", (owner,)).fetchone()[0])

        return await self._db.write(work)

    async def _one(self, sql: str, parameters: tuple[int, ...]) -> Anchor | None:
        def work(c: sqlite3.Connection) -> Any:
            return c.execute(sql, parameters).fetchone()

        row = await self._db.read(work)
        return None if row is None else _loads(row[0])


class MongoAnchorStore(MongoBacked):
    """The ``AnchorStore`` in MongoDB / FerretDB: collection ``audit_anchors``, ``_id`` = size."""

    def __init__(self, url: str, database: str) -> None:
        super().__init__(url, database)

    async def add(self, anchor: Anchor) -> None:
        """Keep it unless its size is kept."""
        document = {"_id": anchor.size, "anchor": _dumps(anchor), "recorded_at": datetime.now(UTC)}
        with contextlib.suppress(DuplicateKeyError):
            await self._anchors.insert_one(document)

    async def at(self, size: int) -> Anchor | None:
        """The anchor of exactly ``size`` entries."""
        document = await self._anchors.find_one({"_id": size})
        return None if document is None else _loads(document["anchor"])

    async def latest(self) -> Anchor | None:
        """The anchor of the largest size."""
        async for document in self._anchors.find({}).sort("_id", DESCENDING).limit(1):
            return _loads(document["anchor"])
        return None

    async def covering(self, size: int) -> Anchor | None:
        """See ``AnchorStore.covering``."""
        async for document in self._anchors.find({"_id": {"$gte": size}}).sort("_id", ASCENDING).limit(1):
            return _loads(document["anchor"])
        return None

    async def lead(self, owner: str, seconds: float) -> bool:
        """See ``AnchorStore.lead``. As the log's writer lease: a document with a fixed ``_id`` that
        one insert can create (FerretDB's conditional updates are not atomic); a lapsed one is
        deleted, and the holder renews its own."""
        leases = self.collection("audit_state")
        now = datetime.now(UTC)
        lease = {"_id": "anchorer", "owner": owner, "expires": now + timedelta(seconds=seconds)}
        try:
            await leases.insert_one(lease)
        except DuplicateKeyError:
            renewed = await leases.update_one(
                {"_id": "anchorer", "owner": owner}, {"$set": {"expires": lease["expires"]}}
            )
            if renewed.matched_count:
                return True
            await leases.delete_one({"_id": "anchorer", "expires": {"$lt": now}})  # its holder stopped
            return False
        return True

    @property
    def _anchors(self) -> AsyncCollection[Document]:
        return self.collection("audit_anchors")


def _dumps(anchor: Anchor) -> str:
    return json.dumps(anchor.to_json(), sort_keys=True)


def _loads(text: str) -> Anchor:
    return Anchor.from_json(json.loads(text))


class Anchorer:
    """Anchors the log's newest checkpoint whenever one is signed (see the module docstring)."""

    def __init__(
        self,
        audit_log: AuditLog,
        store: AnchorStore,
        ledger: Ledger,
        keyring: Keyring,
        origin: str,
        *,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.log = audit_log
        self.store = store
        self.ledger = ledger
        self.keyring = keyring
        self.origin = origin
        self.retry_delays = tuple(retry_delays)
        self.wake = asyncio.Event()
        self.owner = uuid.uuid4().hex
        self.anchored: Anchor | None = None  # the ledger's latest anchor of the origin, as far as we know
        self.halted: str | None = None  # why anchoring stopped for good (a ledger that is not our log's)
        self.registered: set[tuple[str, bytes]] = set()  # (name, key ID) of the keys registered

    async def prepare(self) -> None:
        """Register the log's public keys and catch up with what the ledger already holds."""
        self.registered = set()
        await self._register_keys()
        on_ledger = await self.ledger.latest(self.origin)
        if on_ledger is not None:
            await self._check_ours(on_ledger)
            await self.store.add(on_ledger)
        self.anchored = on_ledger

    async def anchor_newest(self) -> Anchor | None:
        """Anchor the newest checkpoint if it is beyond the anchored one; the new anchor, or None."""
        newest = await self.log.latest_checkpoint()
        if newest is None or (self.anchored is not None and self.anchored.size >= newest.checkpoint.size):
            return None
        old_size = 0 if self.anchored is None else self.anchored.size
        proof = await self.log.consistency_proof(old_size, newest.checkpoint.size) if old_size else []
        await self._register_signers(newest)
        anchor = await self.ledger.anchor(self.origin, newest.note(), proof)
        await self.store.add(anchor)
        self.anchored = anchor
        log.info(
            "checkpoint anchored",
            extra={"size": anchor.size, "transaction": anchor.transaction_id, "block": anchor.block_number},
        )
        return anchor

    async def run(self, stopping: asyncio.Event) -> None:
        """Prepare, then anchor at every wake-up until ``stopping`` is set; failures are retried
        with backoff, except a ledger that is not this log's (``halted``)."""
        prepared = False
        failures = 0
        while not stopping.is_set():
            self.wake.clear()
            try:
                if not await self.store.lead(self.owner, LEASE_SECONDS):
                    prepared = False  # another process anchors; catch up with the ledger if we take over
                else:
                    if not prepared:
                        await self.prepare()
                        prepared = True
                    await self.anchor_newest()
                failures = 0
            except AnchorRefusedError as error:
                if self.halted:
                    log.error("anchoring stopped: %s", self.halted)  # noqa: TRY400 - the reason is the message
                    return
                # Another writer may have anchored meanwhile: read the ledger again, then retry.
                log.warning("the ledger refused a request (%s); reading it again before retrying", error)
                prepared, failures = False, failures + 1
            except AnchorError as error:
                log.warning("anchoring failed (%s); retrying", error)
                failures += 1
            except Exception:
                log.exception("anchoring failed; retrying")
                failures += 1
            if failures:
                delay = self.retry_delays[min(failures, len(self.retry_delays)) - 1]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first_of(self.wake, stopping), POLL_SECONDS)

    async def _register_signers(self, signed: SignedCheckpoint) -> None:
        """Register the keys that signed ``signed`` if they are not yet: a key rotated after
        ``prepare``, maybe by another process (the keyring is then read again at once)."""
        signers = {(s.name, s.key_id) for s in signed.signatures}
        if signers <= self.registered:
            return
        held = {(key.name, key.key_id) for key in self.keyring.signing_keys()}
        if not signers <= held:
            await asyncio.to_thread(self.keyring.refresh, force=True)
        await self._register_keys()

    async def _register_keys(self) -> None:
        """Register every key of the keyring not registered yet (registration is idempotent)."""
        for key in self.keyring.signing_keys():
            if (key.name, key.key_id) not in self.registered:
                await self.ledger.register_key(self.origin, key.name, key.public_key)
                self.registered.add((key.name, key.key_id))
                log.info("signing key registered with the ledger", extra={"key": key.name})

    async def _check_ours(self, anchor: Anchor) -> None:
        """Refuse to go on from a ledger anchor whose root is not the log's at that size."""
        size = await self.log.size()
        if anchor.size > size or await self.log.root(anchor.size) != anchor.root:
            self.halted = (
                f"the ledger anchors origin {self.origin} at size {anchor.size} with root "
                f"{anchor.root.hex()}, which is not this log's (size {size}): "
                "the log or the ledger was rewritten"
            )
            raise AnchorRefusedError(self.halted)
        SignedCheckpoint.parse(anchor.note)  # the note the ledger holds is well formed


async def _first_of(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
