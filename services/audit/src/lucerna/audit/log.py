"""The append-only log's storage: entries with dense sequence numbers, the Merkle tree's nodes and
the signed checkpoints, behind one port (``AuditLog``) with a SQLite and a MongoDB adapter.

An entry carries an idempotency key (the audit event's message id): appending a key already in
the log appends nothing and answers the existing sequence number, so a redelivered record is in
the log once. Each complete subtree's hash is stored when its last leaf is appended, in the same
write, as ``(level, index) -> hash`` (see ``merkle``): a root or a proof then reads O(log n) nodes
and no leaf data. Checkpoints are kept forever, one per tree size, and only when their root is the
log's root at that size.

SQLite: one file on core's ``SqliteDatabase`` (one writer thread, WAL) with ``synchronous=FULL``
on the writer, so the WAL is synced at every commit: an append is durable when ``append`` returns,
and a batch is one transaction (all of it, or none of it, after a crash).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from pymongo import DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from lucerna.audit import merkle
from lucerna.audit.checkpoints import CheckpointError, SignedCheckpoint
from lucerna.audit.merkle import Address
from lucerna.core.storage.backing import Document, MongoBacked, SqliteBacked


@dataclass(frozen=True)
class LogEntry:
    """What to append: the idempotency key and the entry's bytes (its leaf is their ``leaf_hash``)."""

    key: str
    data: bytes


@dataclass(frozen=True)
class Appended:
    """Where an entry is: its sequence number, its leaf hash, and whether this append added it."""

    seq: int
    leaf_hash: bytes
    new: bool


@dataclass(frozen=True)
class StoredEntry:
    """An entry as the log holds it."""

    seq: int
    key: str
    data: bytes
    appended_at: datetime

    @property
    def leaf_hash(self) -> bytes:
        """The entry's leaf hash in the tree."""
        return merkle.leaf_hash(self.data)


class LogRangeError(ValueError):
    """A sequence number or tree size beyond the log (or a size pair in the wrong order)."""


class AuditLog(Protocol):
    """The durable, append-only Merkle log."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def append(self, entries: Sequence[LogEntry]) -> list[Appended]:
        """Append the entries whose key is not in the log, in order, at once; one result per entry
        (an already-logged key answers its existing place, with ``new`` false)."""
        ...

    async def size(self) -> int:
        """The number of entries."""
        ...

    async def entry(self, seq: int) -> StoredEntry | None:
        """The entry at ``seq``, or None."""
        ...

    async def entry_by_key(self, key: str) -> StoredEntry | None:
        """The entry with idempotency key ``key``, or None."""
        ...

    async def root(self, size: int | None = None) -> bytes:
        """The tree's root at ``size`` entries (default: all)."""
        ...

    async def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """The audit path of entry ``seq`` in the tree of ``size`` entries."""
        ...

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """The consistency proof from the tree of ``old_size`` entries to that of ``new_size``."""
        ...

    async def add_checkpoint(self, signed: SignedCheckpoint) -> bool:
        """Keep a signed checkpoint; False if one of that size is kept already (it stays).
        ``CheckpointError`` if its root is not the log's root at its size."""
        ...

    async def latest_checkpoint(self) -> SignedCheckpoint | None:
        """The checkpoint of the largest size, or None."""
        ...

    async def checkpoint(self, size: int) -> SignedCheckpoint | None:
        """The checkpoint of exactly ``size`` entries, or None."""
        ...

    async def checkpoints(self, limit: int = 100, before_size: int | None = None) -> list[SignedCheckpoint]:
        """Checkpoints newest first, those below ``before_size`` when given (to page back)."""
        ...


def _check_sizes(seq_or_old: int, size: int, log_size: int, *, inclusion: bool) -> None:
    """Refuse a proof request the log cannot answer, with the reason."""
    if size > log_size:
        raise LogRangeError(f"tree size {size} is beyond the log's {log_size} entries")
    if inclusion and not 0 <= seq_or_old < size:
        raise LogRangeError(f"entry {seq_or_old} is not in the tree of size {size}")
    if not inclusion and not 0 <= seq_or_old <= size:
        raise LogRangeError(f"no consistency proof from size {seq_or_old} to size {size}")


class Frontier:
    """The complete subtrees of the tree's binary decomposition (largest first): all an append
    needs to compute the nodes it completes."""

    def __init__(self, size: int, hashes: Sequence[bytes]) -> None:
        self.size = size
        self._stack = [
            (level, index, h)
            for (level, index), h in zip(merkle.range_addresses(0, size), hashes, strict=True)
        ]

    def push(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Append a leaf; the complete subtrees it finishes, the leaf first."""
        finished = [(0, self.size, leaf)]
        self._stack.append(finished[0])
        self.size += 1
        while len(self._stack) > 1 and self._stack[-1][0] == self._stack[-2][0]:
            right = self._stack.pop()
            level, index, left = self._stack.pop()
            parent = (level + 1, index >> 1, merkle.node_hash(left, right[2]))
            self._stack.append(parent)
            finished.append(parent)
        return finished


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,            -- dense: 0, 1, 2, ...
    key TEXT NOT NULL UNIQUE,           -- idempotency key
    data BLOB NOT NULL,
    appended_at REAL NOT NULL           -- epoch seconds
);
CREATE TABLE IF NOT EXISTS nodes (      -- every complete subtree's hash (level 0: the leaves)
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    note TEXT NOT NULL,                 -- the signed note, as signed
    added_at REAL NOT NULL
);
"""


class SqliteAuditLog(SqliteBacked):
    """The ``AuditLog`` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    async def start(self) -> None:
        """Open the file, create the tables, and make every commit synced to disk."""
        await super().start()
        # The writer thread keeps this one connection; only it writes.
        await self._db.script("PRAGMA synchronous = FULL")

    async def append(self, entries: Sequence[LogEntry]) -> list[Appended]:
        """One transaction for the batch (see ``AuditLog.append``)."""
        if not entries:
            return []
        return await self._db.write(lambda c: _append(c, entries, time.time()))

    async def size(self) -> int:
        """The number of entries."""
        return await self._db.read(_size)

    async def entry(self, seq: int) -> StoredEntry | None:
        """The entry at ``seq``, or None."""
        sql = "SELECT seq, key, data, appended_at FROM entries WHERE seq = ?"
        row = await self._db.read(lambda c: c.execute(sql, (seq,)).fetchone())
        return None if row is None else _entry(row)

    async def entry_by_key(self, key: str) -> StoredEntry | None:
        """The entry with this idempotency key, or None."""
        sql = "SELECT seq, key, data, appended_at FROM entries WHERE key = ?"
        row = await self._db.read(lambda c: c.execute(sql, (key,)).fetchone())
        return None if row is None else _entry(row)

    async def root(self, size: int | None = None) -> bytes:
        """The root at ``size`` entries (default: all)."""
        return await self._db.read(lambda c: _root(c, size))

    async def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """The audit path of ``seq`` in the tree of ``size`` entries."""

        def work(c: sqlite3.Connection) -> list[bytes]:
            _check_sizes(seq, size, _size(c), inclusion=True)
            nodes = _nodes(c, merkle.inclusion_addresses(seq, size))
            return merkle.inclusion_proof(seq, size, lambda level, index: nodes[(level, index)])

        return await self._db.read(work)

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """The consistency proof from ``old_size`` to ``new_size`` entries."""

        def work(c: sqlite3.Connection) -> list[bytes]:
            _check_sizes(old_size, new_size, _size(c), inclusion=False)
            nodes = _nodes(c, merkle.consistency_addresses(old_size, new_size))
            return merkle.consistency_proof(old_size, new_size, lambda level, index: nodes[(level, index)])

        return await self._db.read(work)

    async def add_checkpoint(self, signed: SignedCheckpoint) -> bool:
        """Keep it unless one of its size is kept (see ``AuditLog.add_checkpoint``)."""

        def work(c: sqlite3.Connection) -> bool:
            size = signed.checkpoint.size
            if c.execute("SELECT 1 FROM checkpoints WHERE size = ?", (size,)).fetchone() is not None:
                return False
            _check_root(signed, _size(c), lambda: _root(c, size))
            c.execute("INSERT INTO checkpoints VALUES (?, ?, ?)", (size, signed.note(), time.time()))
            return True

        return await self._db.write(work)

    async def latest_checkpoint(self) -> SignedCheckpoint | None:
        """The checkpoint of the largest size, or None."""
        found = await self.checkpoints(limit=1)
        return found[0] if found else None

    async def checkpoint(self, size: int) -> SignedCheckpoint | None:
        """The checkpoint of exactly ``size`` entries, or None."""
        row = await self._db.read(
            lambda c: c.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        )
        return None if row is None else SignedCheckpoint.parse(row[0])

    async def checkpoints(self, limit: int = 100, before_size: int | None = None) -> list[SignedCheckpoint]:
        """Newest first; below ``before_size`` when given."""
        below = before_size if before_size is not None else 2**63 - 1
        sql = "SELECT note FROM checkpoints WHERE size < ? ORDER BY size DESC LIMIT ?"
        rows = await self._db.read(lambda c: c.execute(sql, (below, limit)).fetchall())
        return [SignedCheckpoint.parse(note) for (note,) in rows]


def _check_root(signed: SignedCheckpoint, log_size: int, root_at_size: Callable[[], bytes]) -> None:
    """Refuse a checkpoint beyond the log or whose root is not the log's at its size."""
    size = signed.checkpoint.size
    if size > log_size:
        raise CheckpointError(f"checkpoint size {size} is beyond the log's {log_size} entries")
    if root_at_size() != signed.checkpoint.root:
        raise CheckpointError(f"the checkpoint's root is not the log's root at size {size}")


def _size(c: sqlite3.Connection) -> int:
    row = c.execute("SELECT seq FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    return 0 if row is None else int(row[0]) + 1


def _nodes(c: sqlite3.Connection, addresses: Iterable[Address]) -> dict[Address, bytes]:
    # One primary-key lookup per node: SQLite does not use the index for a row-value IN list.
    found = {}
    for level, idx in addresses:
        row = c.execute("SELECT hash FROM nodes WHERE level = ? AND idx = ?", (level, idx)).fetchone()
        if row is None:
            raise RuntimeError(f"the log's tree is missing node {(level, idx)}: the file is damaged")
        found[(level, idx)] = row[0]
    return found


def _root(c: sqlite3.Connection, size: int | None) -> bytes:
    log_size = _size(c)
    if size is None:
        size = log_size
    if not 0 <= size <= log_size:
        raise LogRangeError(f"tree size {size} is beyond the log's {log_size} entries")
    nodes = _nodes(c, merkle.range_addresses(0, size))
    return merkle.tree_root(lambda level, index: nodes[(level, index)], size)


def _append(c: sqlite3.Connection, entries: Sequence[LogEntry], now: float) -> list[Appended]:
    keys = list({entry.key: None for entry in entries})
    known: dict[str, Appended] = {}
    for start in range(0, len(keys), 500):  # SQLite caps bound parameters
        chunk = keys[start : start + 500]
        sql = f"SELECT key, seq, data FROM entries WHERE key IN ({', '.join('?' * len(chunk))})"  # noqa: S608
        for key, seq, data in c.execute(sql, chunk):
            known[key] = Appended(seq, merkle.leaf_hash(data), new=False)
    size = _size(c)
    addresses = merkle.range_addresses(0, size)
    stored = _nodes(c, addresses)
    frontier = Frontier(size, [stored[a] for a in addresses])
    results, rows, node_rows = [], [], []
    for entry in entries:
        done = known.get(entry.key)
        if done is None:
            leaf = merkle.leaf_hash(entry.data)
            seq = frontier.size
            node_rows.extend(frontier.push(leaf))
            rows.append((seq, entry.key, entry.data, now))
            known[entry.key] = Appended(seq, leaf, new=False)  # a repeat later in this batch is not new
            done = Appended(seq, leaf, new=True)
        results.append(done)
    c.executemany("INSERT INTO entries VALUES (?, ?, ?, ?)", rows)
    c.executemany("INSERT INTO nodes VALUES (?, ?, ?)", node_rows)
    return results


def _entry(row: Sequence[Any]) -> StoredEntry:
    seq, key, data, appended_at = row
    return StoredEntry(seq, key, data, datetime.fromtimestamp(appended_at, UTC))


# --- MongoDB (and FerretDB v1) ---------------------------------------------------------------------

LEASE_SECONDS = 10.0  # far longer than one batch takes
_WAIT_SECONDS = 30.0  # how long an append waits for another process's lease


class MongoAuditLog(MongoBacked):
    """The ``AuditLog`` in a MongoDB (or FerretDB v1) database, reading only by ``_id``.

    Collections: ``audit_entries`` (``_id`` = seq), ``audit_keys`` (``_id`` = idempotency key,
    its ``seq``), ``audit_nodes`` (``_id`` = ``"<level>/<index>"``), ``audit_checkpoints``
    (``_id`` = size) and ``audit_state``: ``writer``, the appenders' lease, and ``tree``, the
    published size. There are no transactions, so:

    - Appenders take turns under the lease, a document inserted with a fixed ``_id`` (FerretDB
      refuses a second insert atomically; conditional updates are not atomic there). Under it, the
      keys are checked and the entries inserted, each claiming its ``_id`` = seq: a taken seq (a
      writer whose lease expired under it) aborts the batch rather than leave a gap or a duplicate.
    - A batch becomes visible when ``tree.size`` moves past it, after its entries, nodes and keys
      are all written; readers never look beyond it. A writer that died mid-batch leaves entries
      past the published size: the next lease holder completes their nodes and keys and publishes
      them (their records were not acknowledged; redelivered, they find their keys).
    """

    def __init__(self, url: str, database: str) -> None:
        super().__init__(url, database)  # collections need no index beyond ``_id``
        self._turn = asyncio.Lock()  # this process's appenders take turns before contending for the lease

    def _named(self, name: str) -> AsyncCollection[Document]:
        return self.collection(f"audit_{name}")

    async def append(self, entries: Sequence[LogEntry]) -> list[Appended]:
        """Under the lease (see the class docstring)."""
        if not entries:
            return []
        async with self._turn:
            owner = await self._take_lease()
            try:
                size = await self._complete_unpublished()
                return await self._append(entries, size)
            finally:
                await self._named("state").delete_one({"_id": "writer", "owner": owner})

    async def size(self) -> int:
        """The published size."""
        state = await self._named("state").find_one({"_id": "tree"})
        return 0 if state is None else int(state["size"])

    async def entry(self, seq: int) -> StoredEntry | None:
        """The entry at ``seq`` if published, or None."""
        if not 0 <= seq < await self.size():
            return None
        document = await self._named("entries").find_one({"_id": seq})
        return None if document is None else _entry_of(document)

    async def entry_by_key(self, key: str) -> StoredEntry | None:
        """The published entry with this key, or None."""
        found = await self._named("keys").find_one({"_id": key})
        return None if found is None else await self.entry(int(found["seq"]))

    async def root(self, size: int | None = None) -> bytes:
        """The root at ``size`` entries (default: all published)."""
        log_size = await self.size()
        size = log_size if size is None else size
        if not 0 <= size <= log_size:
            raise LogRangeError(f"tree size {size} is beyond the log's {log_size} entries")
        nodes = await self._nodes(merkle.range_addresses(0, size))
        return merkle.tree_root(lambda level, index: nodes[(level, index)], size)

    async def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """The audit path of ``seq`` in the tree of ``size`` entries."""
        _check_sizes(seq, size, await self.size(), inclusion=True)
        nodes = await self._nodes(merkle.inclusion_addresses(seq, size))
        return merkle.inclusion_proof(seq, size, lambda level, index: nodes[(level, index)])

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """The consistency proof from ``old_size`` to ``new_size`` entries."""
        _check_sizes(old_size, new_size, await self.size(), inclusion=False)
        nodes = await self._nodes(merkle.consistency_addresses(old_size, new_size))
        return merkle.consistency_proof(old_size, new_size, lambda level, index: nodes[(level, index)])

    async def add_checkpoint(self, signed: SignedCheckpoint) -> bool:
        """Keep it unless one of its size is kept (a taken ``_id``)."""
        size = signed.checkpoint.size
        log_size = await self.size()
        root = await self.root(size) if size <= log_size else b""
        _check_root(signed, log_size, lambda: root)
        document = {"_id": size, "note": signed.note(), "added_at": datetime.now(UTC)}
        try:
            await self._named("checkpoints").insert_one(document)
        except DuplicateKeyError:
            return False
        return True

    async def latest_checkpoint(self) -> SignedCheckpoint | None:
        """The checkpoint of the largest size, or None."""
        found = await self.checkpoints(limit=1)
        return found[0] if found else None

    async def checkpoint(self, size: int) -> SignedCheckpoint | None:
        """The checkpoint of exactly ``size`` entries, or None."""
        document = await self._named("checkpoints").find_one({"_id": size})
        return None if document is None else SignedCheckpoint.parse(document["note"])

    async def checkpoints(self, limit: int = 100, before_size: int | None = None) -> list[SignedCheckpoint]:
        """Newest first; below ``before_size`` when given (a range on ``_id``, sorted by ``_id``)."""
        selector: Document = {} if before_size is None else {"_id": {"$lt": before_size}}
        found = self._named("checkpoints").find(selector, ["note"]).sort("_id", DESCENDING).limit(limit)
        return [SignedCheckpoint.parse(document["note"]) async for document in found]

    async def _take_lease(self) -> str:
        owner = uuid.uuid4().hex
        state = self._named("state")
        deadline = time.monotonic() + _WAIT_SECONDS
        while True:
            now = datetime.now(UTC)
            lease = {"_id": "writer", "owner": owner, "expires": now + timedelta(seconds=LEASE_SECONDS)}
            try:
                await state.insert_one(lease)
            except DuplicateKeyError:
                await state.delete_one({"_id": "writer", "expires": {"$lt": now}})  # its writer died
            else:
                return owner
            if time.monotonic() > deadline:
                raise TimeoutError(f"the audit log's append lease stayed taken for {_WAIT_SECONDS:.0f} s")
            await asyncio.sleep(0.005)

    async def _complete_unpublished(self) -> int:
        """Complete and publish entries a dead writer left past the published size; the size."""
        published = await self.size()
        entries = self._named("entries")
        orphans: list[Document] = []
        while (document := await entries.find_one({"_id": published + len(orphans)})) is not None:
            orphans.append(document)
        if not orphans:
            return published
        addresses = merkle.range_addresses(0, published)
        stored = await self._nodes(addresses)
        frontier = Frontier(published, [stored[a] for a in addresses])
        nodes = [node for document in orphans for node in frontier.push(merkle.leaf_hash(document["data"]))]
        keys = [{"_id": document["key"], "seq": document["_id"]} for document in orphans]
        await self._insert_missing("nodes", [_node_document(node) for node in nodes])
        await self._insert_missing("keys", keys)
        await self._publish(frontier.size)
        return frontier.size

    async def _append(self, entries: Sequence[LogEntry], size: int) -> list[Appended]:
        unique = list({entry.key: None for entry in entries})
        found = await asyncio.gather(*(self._named("keys").find_one({"_id": key}) for key in unique))
        known: dict[str, Appended] = {}
        for document in (d for d in found if d is not None):
            stored = await self._named("entries").find_one({"_id": document["seq"]})
            if stored is None:  # pragma: no cover - keys are written after their entries
                raise RuntimeError(f"audit key {document['_id']} points at missing entry {document['seq']}")
            known[document["_id"]] = Appended(document["seq"], merkle.leaf_hash(stored["data"]), new=False)
        addresses = merkle.range_addresses(0, size)
        stored_nodes = await self._nodes(addresses)
        frontier = Frontier(size, [stored_nodes[a] for a in addresses])
        now = datetime.now(UTC)
        results, new_entries, nodes = [], [], []
        for entry in entries:
            done = known.get(entry.key)
            if done is None:
                leaf = merkle.leaf_hash(entry.data)
                seq = frontier.size
                nodes.extend(frontier.push(leaf))
                new_entries.append({"_id": seq, "key": entry.key, "data": entry.data, "appended_at": now})
                known[entry.key] = Appended(seq, leaf, new=False)
                done = Appended(seq, leaf, new=True)
            results.append(done)
        if new_entries:
            try:  # each insert claims its seq: a taken one means another writer is (still) appending
                await self._named("entries").insert_many(new_entries, ordered=True)
            except BulkWriteError as error:
                raise RuntimeError(f"another writer took audit log seq {size} or after; retry") from error
            await self._insert_missing("nodes", [_node_document(node) for node in nodes])
            await self._insert_missing("keys", [{"_id": e["key"], "seq": e["_id"]} for e in new_entries])
            await self._publish(frontier.size)
        return results

    async def _publish(self, size: int) -> None:
        # Only the lease holder publishes, and sizes only grow: an upsert of the larger value.
        await self._named("state").update_one({"_id": "tree"}, {"$max": {"size": size}}, upsert=True)

    async def _insert_missing(self, name: str, documents: list[Document]) -> None:
        """Insert documents whose ``_id`` may already be there (a dead writer's): same content."""
        if not documents:
            return
        try:
            await self._named(name).insert_many(documents, ordered=False)
        except BulkWriteError as error:
            if any(e.get("code") != _DUPLICATE_KEY for e in error.details.get("writeErrors", [])):
                raise

    async def _nodes(self, addresses: Iterable[Address]) -> dict[Address, bytes]:
        wanted = list(addresses)
        found = await asyncio.gather(
            *(self._named("nodes").find_one({"_id": f"{lv}/{ix}"}) for lv, ix in wanted)
        )
        nodes = {}
        for address, document in zip(wanted, found, strict=True):
            if document is None:
                raise RuntimeError(f"the log's tree is missing node {address}: the database is damaged")
            nodes[address] = bytes(document["hash"])
        return nodes


_DUPLICATE_KEY = 11000


def _node_document(node: tuple[int, int, bytes]) -> Document:
    level, index, value = node
    return {"_id": f"{level}/{index}", "hash": value}


def _entry_of(document: Document) -> StoredEntry:
    appended_at: datetime = document["appended_at"]
    return StoredEntry(int(document["_id"]), document["key"], bytes(document["data"]), appended_at)
