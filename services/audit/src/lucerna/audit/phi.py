"""PHI at rest: the PHI fields of an audit record (``patient``, ``query``, ``dicom_patient``) are
sealed to the audit service's own X25519 + ML-KEM-768 key pair before the record becomes a log entry.

The entry keeps the record with those fields cleared and ``details["phi_sha256"]``, the SHA-256 of
the sealed blob, so the log commits to the ciphertext while holding no PHI; the blob lives in a side
store (``PhiStore``) under the entry's key, and its AAD names that key, so a blob moved to another
entry does not open. A redelivered record keeps the first blob: the entry already commits to it.

The patient is searchable through a blind index: HMAC-SHA256 of ``"Patient/<id>"`` under a key of
its own (``phi-index-key.bin``), so the search index never holds the reference either (a DICOM
patient is indexed as the FHIR Patient the FHIR service makes of it: ``accesses``).

The at-rest keys are a ring in the audit key directory, files created 0600
(``lucerna.core.secret_files``): ``phi-key.bin`` (key 1, made on first start), then
``phi-key-<n>.bin`` per rotation (``rotate``). New blobs are sealed to the newest key and framed
with its key ID; a blob opens with the key it names, an unframed one (sealed before rotation
existed) with key 1. The index key never rotates (ADR 0018). Losing a key loses the PHI of the
records sealed to it, never the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

KEY_FILE = "phi-key.bin"  # key 1: the only one before rotation, still read as such
INDEX_KEY_FILE = "phi-index-key.bin"
ALGORITHM = "X25519+ML-KEM-768"
PHI_DIGEST = "phi_sha256"  # the details key of the sealed blob's SHA-256
# A PHI key is taken up by a running service within this many seconds of its rotation.
REFRESH_SECONDS = 2.0
_AAD = b"lucerna/audit/phi/v1\n"  # blobs of key 1 sealed before keys had ids: no frame
_FRAMED_AAD = b"lucerna/audit/phi/v2\n"  # then the frame's key ID, then the entry key
# A framed blob: this marker, the key ID, the sealed blob (whose first byte, pqchannel.VERSION = 1,
# is never this marker's first one, so an unframed blob of key 1 is told apart).
_FRAME = b"PHK\x01"
_KEY_ID_SIZE = 8
_RING_FILE = re.compile(r"phi-key-([2-9]|[1-9][0-9]+)\.bin")  # key 2 on; key 1 is KEY_FILE
_DUPLICATE_KEY = 11000
_INDEX_INFO = b"lucerna/audit/patient-index/v1"
_INDEX_KEY_SIZE = 32


class PhiKeyError(RuntimeError):
    """The at-rest key file is unsafe or unusable; the message names the file."""


@dataclass(frozen=True)
class PhiKey:
    """One at-rest key pair of the ring: its number, file, ID (SHA-256 of the public keys, first 8
    bytes) and when its file was written."""

    number: int
    path: Path
    private: RecipientPrivateKeys = field(repr=False)
    key_id: bytes
    created: datetime

    @property
    def name(self) -> str:
        """``phi-key-<n>`` (key 1 lives in ``phi-key.bin``)."""
        return f"phi-key-{self.number}"


def key_path(directory: Path, number: int) -> Path:
    """The file of PHI key ``number``."""
    return directory / (KEY_FILE if number == 1 else f"phi-key-{number}.bin")


def load_ring(directory: Path) -> dict[int, PhiKey]:
    """Every PHI key in ``directory`` by number (none created); ``PhiKeyError`` naming a bad file."""
    return {number: _load(key_path(directory, number), number) for number in _numbers(directory)}


def _numbers(directory: Path) -> set[int]:
    """The numbers of the key files in ``directory`` (a listing; no file is read)."""
    numbers = {int(m.group(1)) for path in directory.iterdir() if (m := _RING_FILE.fullmatch(path.name))}
    return numbers | {1} if (directory / KEY_FILE).exists() else numbers


def rotate(directory: Path) -> PhiKey:
    """Make a new PHI key the newest (it seals from then on); refused when the ring is empty."""
    ring = load_ring(directory)
    if not ring:
        raise PhiKeyError(f"no PHI key in {directory}: nothing to rotate")
    number = max(ring) + 1
    if create_secret_file(key_path(directory, number), RecipientPrivateKeys.generate().to_bytes()):
        log.info("created PHI at-rest key %d in %s", number, directory)
    ring = load_ring(directory)  # a concurrent rotation may have taken the number: the newest
    return ring[max(ring)]


class PhiKeys:
    """The ring of at-rest key pairs (the newest seals, each opens its own blobs) and the blind-index
    key, which never rotates: one patient keeps one index value across rotations."""

    def __init__(self, directory: Path, ring: dict[int, PhiKey], index_key: bytes) -> None:
        self.directory = directory
        self._ring = ring
        self._by_id = {key.key_id: key for key in ring.values()}
        self._index_key = index_key
        self._listed = time.monotonic()

    def __repr__(self) -> str:
        return f"PhiKeys({str(self.directory)!r}, keys={sorted(self._ring)})"

    @classmethod
    def load_or_create(cls, directory: Path) -> PhiKeys:
        """The keys in ``directory``; key 1 (``phi-key.bin``) and the index key created (0600) when
        missing. A directory made before the index key had its own file gets the key its index
        rows were made with (derived from key 1); a new one gets a random key."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        index_path, first = directory / INDEX_KEY_FILE, directory / KEY_FILE
        if not index_path.exists():
            # An existing directory keeps the index its rows were made with; a new one, a random key.
            derived = first.exists()
            seed = _derived_index_key(_load(first, 1)) if derived else secrets.token_bytes(_INDEX_KEY_SIZE)
            if create_secret_file(index_path, seed):
                log.info("created the patient blind-index key in %s", index_path)
        if not first.exists() and create_secret_file(first, RecipientPrivateKeys.generate().to_bytes()):
            log.info("created the audit log's at-rest key pair in %s", first)
        index_key = _read(index_path, "patient blind-index key", _INDEX_KEY_SIZE)
        return cls(directory, load_ring(directory), index_key)

    @property
    def active(self) -> PhiKey:
        """The key new blobs are sealed to (the newest)."""
        ring = self._ring  # one read: ``refresh`` swaps it
        return ring[max(ring)]

    def refresh(self, *, force: bool = False) -> bool:
        """Read the ring again if the directory holds other key files (a rotation by ``lucerna
        audit-keys rotate --phi`` or another process); lists it at most every ``REFRESH_SECONDS``
        unless ``force``. A file that cannot be used is logged and the keys held stay in use."""
        now = time.monotonic()
        if not force and now - self._listed < REFRESH_SECONDS:
            return False
        self._listed = now
        try:
            listed = _numbers(self.directory)
            if not listed or listed == set(self._ring):
                return False
            ring = load_ring(self.directory)
        except (OSError, PhiKeyError) as error:
            log.error("PHI keys not reloaded, %s stays active: %s", self.active.name, error)  # noqa: TRY400 - the reason is the message
            return False
        self._by_id = {key.key_id: key for key in ring.values()}
        self._ring = ring
        log.info("PHI keys reloaded: %s (key ID %s) seals", self.active.name, self.active.key_id.hex())
        return True

    def patient_index(self, patient: str) -> str:
        """The blind index of a ``"Patient/<id>"`` reference (hex HMAC-SHA256)."""
        return hmac.new(self._index_key, patient.encode(), hashlib.sha256).hexdigest()

    def seal(self, key: str, phi: events_pb2.AuditRecord) -> bytes:
        """``phi`` (a record holding only PHI fields) sealed for the entry ``key`` to the newest key,
        framed with that key's ID (bound by the AAD too)."""
        self.refresh()
        active = self.active
        aad = _FRAMED_AAD + active.key_id + key.encode()
        return _FRAME + active.key_id + seal(active.private.public, phi.SerializeToString(), aad)

    def open(self, key: str, blob: bytes) -> events_pb2.AuditRecord:
        """The PHI fields sealed for ``key``, with the key the blob names (an unframed blob: key 1);
        ``ChannelError`` if the blob is not that entry's or its key is not in the ring."""
        if not blob.startswith(_FRAME):
            legacy = self._ring.get(1)
            if legacy is None:
                raise ChannelError(f"the blob was sealed to PHI key 1, which is not in {self.directory}")
            return events_pb2.AuditRecord.FromString(open_sealed(legacy.private, blob, _AAD + key.encode()))
        key_id = blob[len(_FRAME) : len(_FRAME) + _KEY_ID_SIZE]
        found = self._by_id.get(key_id)
        if found is None and self.refresh(force=True):  # sealed by another process after a rotation
            found = self._by_id.get(key_id)
        if found is None:
            raise ChannelError(
                f"the blob was sealed to PHI key {key_id.hex()}, which is not in {self.directory}"
            )
        sealed = blob[len(_FRAME) + _KEY_ID_SIZE :]
        return events_pb2.AuditRecord.FromString(
            open_sealed(found.private, sealed, _FRAMED_AAD + key_id + key.encode())
        )


def _derived_index_key(first: PhiKey) -> bytes:
    """The index key as it was derived from key 1 before it had its own file (ADR 0018)."""
    return HKDF(hashes.SHA256(), _INDEX_KEY_SIZE, None, _INDEX_INFO).derive(first.private.to_bytes())


def _read(path: Path, what: str, size: int | None = None) -> bytes:
    try:
        content = read_secret_file(path)
    except UnsafeSecretFileError as error:
        raise PhiKeyError(str(error)) from None
    except OSError as error:
        raise PhiKeyError(f"the {what} {path} cannot be read: {error}") from None
    if size is not None and len(content) != size:
        raise PhiKeyError(f"{path} is not a usable {what}: {len(content)} bytes, not {size}")
    return content


def _load(path: Path, number: int) -> PhiKey:
    content = _read(path, "PHI key")
    try:
        private = RecipientPrivateKeys.from_bytes(content)
    except ChannelError as error:
        raise PhiKeyError(f"{path} is not a usable X25519 + ML-KEM-768 key pair: {error}") from None
    key_id = hashlib.sha256(private.public.to_bytes()).digest()[:_KEY_ID_SIZE]
    created = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return PhiKey(number, path, private, key_id, created)


PHI_FIELDS = ("patient", "query", "dicom_patient")  # sealed at rest (events.proto says which are PHI)


def split_phi(record: events_pb2.AuditRecord) -> tuple[events_pb2.AuditRecord, events_pb2.AuditRecord | None]:
    """The record without PHI, and its PHI fields alone (None when it has none)."""
    dicom = record.HasField("dicom_patient")
    if not record.patient and not record.query and not dicom:
        return record, None
    phi = events_pb2.AuditRecord(patient=record.patient, query=record.query)
    if dicom:
        phi.dicom_patient.CopyFrom(record.dicom_patient)
    cleared = events_pb2.AuditRecord()
    cleared.CopyFrom(record)
    for name in PHI_FIELDS:
        cleared.ClearField(name)
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
