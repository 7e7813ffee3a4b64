"""PHI at rest: the PHI fields of an audit record (``patient``, ``query``) are sealed to the audit
service's own X25519 + ML-KEM-768 key pair before the record becomes a log entry.

The entry keeps the record with those fields cleared and ``details["phi_sha256"]``, the SHA-256 of
the sealed blob, so the log commits to the ciphertext while holding no PHI; the blob lives in a side
store (``PhiStore``) under the entry's key, and its AAD names that key, so a blob moved to another
entry does not open. A redelivered record keeps the first blob: the entry already commits to it.

The patient is searchable through a blind index: HMAC-SHA256 of ``"Patient/<id>"`` under a key
derived (HKDF) from the at-rest private keys, so the search index never holds the reference either.

The key pair is one file, ``phi-key.bin`` in the audit key directory, created 0600 on first start
(``lucerna.core.secret_files``); losing it loses the PHI of every record, never the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from lucerna.core.pqchannel import ChannelError, RecipientPrivateKeys, open_sealed, seal
from lucerna.core.secret_files import UnsafeSecretFileError, create_secret_file, read_secret_file
from lucerna.core.storage.backing import Document, MongoBacked, SqliteBacked
from lucerna.events.v1 import events_pb2

log = logging.getLogger(__name__)

KEY_FILE = "phi-key.bin"
PHI_DIGEST = "phi_sha256"  # the details key of the sealed blob's SHA-256
_AAD = b"lucerna/audit/phi/v1\n"
_DUPLICATE_KEY = 11000
_INDEX_INFO = b"lucerna/audit/patient-index/v1"


class PhiKeyError(RuntimeError):
    """The at-rest key file is unsafe or unusable; the message names the file."""


@dataclass(frozen=True)
class PhiKeys:
    """The at-rest key pair and the blind-index key derived from it."""

    private: RecipientPrivateKeys = field(repr=False)
    index_key: bytes = field(repr=False)

    @classmethod
    def of(cls, private: RecipientPrivateKeys) -> PhiKeys:
        """The keys of ``private`` (the index key is derived, never stored)."""
        index_key = HKDF(hashes.SHA256(), 32, None, _INDEX_INFO).derive(private.to_bytes())
        return cls(private, index_key)

    @classmethod
    def load_or_create(cls, directory: Path) -> PhiKeys:
        """The key pair in ``directory/phi-key.bin``, created (0600) when there is none."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / KEY_FILE
        if not path.exists() and create_secret_file(path, RecipientPrivateKeys.generate().to_bytes()):
            log.info("created the audit log's at-rest key pair in %s", path)
        try:
            return cls.of(RecipientPrivateKeys.from_bytes(read_secret_file(path)))
        except UnsafeSecretFileError as error:
            raise PhiKeyError(str(error)) from None
        except ChannelError as error:
            raise PhiKeyError(f"{path} is not a usable X25519 + ML-KEM-768 key pair: {error}") from None

    def patient_index(self, patient: str) -> str:
        """The blind index of a ``"Patient/<id>"`` reference (hex HMAC-SHA256)."""
        return hmac.new(self.index_key, patient.encode(), hashlib.sha256).hexdigest()

    def seal(self, key: str, phi: events_pb2.AuditRecord) -> bytes:
        """``phi`` (a record holding only PHI fields) sealed for the entry ``key``."""
        return seal(self.private.public, phi.SerializeToString(), _AAD + key.encode())

    def open(self, key: str, blob: bytes) -> events_pb2.AuditRecord:
        """The PHI fields sealed for ``key``; ``ChannelError`` if the blob is not that entry's."""
        return events_pb2.AuditRecord.FromString(open_sealed(self.private, blob, _AAD + key.encode()))


def split_phi(record: events_pb2.AuditRecord) -> tuple[events_pb2.AuditRecord, events_pb2.AuditRecord | None]:
    """The record without PHI, and its PHI fields alone (None when it has none)."""
    if not record.patient and not record.query:
        return record, None
    phi = events_pb2.AuditRecord(patient=record.patient, query=record.query)
    cleared = events_pb2.AuditRecord()
    cleared.CopyFrom(record)
    cleared.ClearField("patient")
    cleared.ClearField("query")
    return cleared, phi


def committed(cleared: events_pb2.AuditRecord, blob: bytes) -> bytes:
    """The entry's bytes: the record without PHI, committing to the sealed blob by its SHA-256."""
    entry = events_pb2.AuditRecord()
    entry.CopyFrom(cleared)
    entry.details[PHI_DIGEST] = hashlib.sha256(blob).hexdigest()
    return entry.SerializeToString(deterministic=True)


class PhiStore(Protocol):
    """Sealed PHI blobs by entry key; the first blob put under a key stays."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def keep_first(self, blobs: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """Keep each ``(key, blob)`` unless a blob is kept under its key already; per item, the blob
        kept (the first one put under its key)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The blob kept under ``key``, or None."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS phi (
    key TEXT PRIMARY KEY,               -- the log entry's idempotency key
    blob BLOB NOT NULL                  -- sealed (lucerna.core.pqchannel.seal)
) WITHOUT ROWID;
"""


class SqlitePhiStore(SqliteBacked):
    """``PhiStore`` in a SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    async def keep_first(self, blobs: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """One transaction: insert unless the key is taken, then read what is kept."""

        def work(c: sqlite3.Connection) -> list[bytes]:
            c.executemany("INSERT OR IGNORE INTO phi VALUES (?, ?)", blobs)
            sql = "SELECT blob FROM phi WHERE key = ?"
            return [bytes(c.execute(sql, (key,)).fetchone()[0]) for key, _ in blobs]

        return await self._db.write(work) if blobs else []

    async def get(self, key: str) -> bytes | None:
        """The kept blob, or None."""
        row = await self._db.read(
            lambda c: c.execute("SELECT blob FROM phi WHERE key = ?", (key,)).fetchone()
        )
        return None if row is None else bytes(row[0])


class MongoPhiStore(MongoBacked):
    """``PhiStore`` in MongoDB (``audit_phi``, ``_id`` = the entry key)."""

    @property
    def _phi(self) -> AsyncCollection[Document]:
        return self.collection("audit_phi")

    async def keep_first(self, blobs: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """Insert all, unordered; where an ``_id`` is taken, the blob already there."""
        if not blobs:
            return []
        firsts = dict(reversed(blobs))  # a key twice in a batch: its first blob
        try:
            await self._phi.insert_many(
                [{"_id": key, "blob": blob} for key, blob in firsts.items()], ordered=False
            )
        except BulkWriteError as error:
            if any(e.get("code") != _DUPLICATE_KEY for e in error.details.get("writeErrors", [])):
                raise
            taken = [key for key, _ in firsts.items()]
            for e in error.details["writeErrors"]:
                key = taken[e["index"]]
                kept = await self.get(key)
                if kept is None:  # pragma: no cover - a duplicate key is there to read
                    raise RuntimeError(f"the sealed PHI of entry {key!r} vanished") from None
                firsts[key] = kept
        return [firsts[key] for key, _ in blobs]

    async def get(self, key: str) -> bytes | None:
        """The kept blob, or None."""
        document = await self._phi.find_one({"_id": key})
        return None if document is None else bytes(document["blob"])
