"""A real audit log grown and checkpointed by the Fabric tests."""

from __future__ import annotations

from lucerna.audit.checkpoints import Checkpoint, SignedCheckpoint, sign
from lucerna.audit.keys import Keyring
from lucerna.audit.log import LogEntry, SqliteAuditLog


async def grow(log: SqliteAuditLog, count: int, prefix: str = "record") -> None:
    """Append ``count`` entries."""
    start = await log.size()
    await log.append(
        [LogEntry(f"{prefix}-{i}", f"{prefix} {i}".encode()) for i in range(start, start + count)]
    )


async def signed_checkpoint(log: SqliteAuditLog, keyring: Keyring, origin: str) -> SignedCheckpoint:
    """A checkpoint of the whole log, signed with the keyring's active key."""
    size = await log.size()
    return sign(Checkpoint(origin, size, await log.root(size)), keyring.active)
