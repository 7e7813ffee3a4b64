"""Filesystem blob store: bytes addressed by SHA-256, written atomically (temp file + rename)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

from lucerna.core.storage.ports import BlobRef


class FilesystemBlobStore:
    """Blobs under ``root/ab/cd/<sha256>``; a ReadWriteMany volume in Kubernetes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, sha256: str) -> Path:
        """Where a blob lives (whether or not it exists)."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise KeyError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    async def put(self, data: bytes) -> BlobRef:
        """Store bytes once; identical bytes already stored are not written again."""
        return await asyncio.to_thread(self._put, data)

    def _put(self, data: bytes) -> BlobRef:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path_of(sha256)
        if target.exists():
            return BlobRef(sha256, len(data), created=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            Path(temp).replace(target)  # atomic: readers see all of the blob or none of it
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return BlobRef(sha256, len(data), created=True)

    async def get(self, sha256: str) -> bytes:
        """The stored bytes; ``KeyError`` when absent."""
        try:
            return await asyncio.to_thread(self.path_of(sha256).read_bytes)
        except FileNotFoundError as missing:
            raise KeyError(sha256) from missing

    async def delete(self, sha256: str) -> None:
        """Remove a blob if present."""
        await asyncio.to_thread(self.path_of(sha256).unlink, missing_ok=True)

    async def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return await asyncio.to_thread(self.path_of(sha256).exists)
