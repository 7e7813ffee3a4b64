"""Filesystem blob store: bytes addressed by SHA-256, written atomically (temp file + rename).

A blob is flushed to disk before it gets its name, so that a crash never leaves a named but
incomplete blob, and is then dropped from the page cache: a stream of newly received instances
would otherwise push out pages worth keeping (and on a VM each new cached page costs a fault).
Writes run on their own threads (hashing and file I/O release the GIL), so that a slow disk holds
up only other writes, not the event loop's default executor.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lucerna.core.storage.ports import BlobRef

WRITE_THREADS = 4  # blobs being hashed, written or flushed at once per process
_flush = getattr(os, "fdatasync", os.fsync)  # fdatasync is missing on macOS


class FilesystemBlobStore:
    """Blobs under ``root/ab/cd/<sha256>``; a ReadWriteMany volume in Kubernetes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writers = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="lucerna-blob-writer")
        self._folders: set[Path] = set()  # known to exist: no mkdir per blob

    def path_of(self, sha256: str) -> Path:
        """Where a blob lives (whether or not it exists)."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise KeyError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    async def put(self, data: bytes) -> BlobRef:
        """Store bytes once; identical bytes already stored are not written again."""
        return await asyncio.get_running_loop().run_in_executor(self._writers, self._put, data)

    def _put(self, data: bytes) -> BlobRef:
        sha256 = hashlib.sha256(data).hexdigest()
        folder = self.root / sha256[:2] / sha256[2:4]
        target = folder / sha256
        if target.exists():
            return BlobRef(sha256, len(data), created=False)
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        try:
            fd, temp = tempfile.mkstemp(dir=folder, prefix=".incoming-")
        except FileNotFoundError:  # the folder was removed behind our back
            folder.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=folder, prefix=".incoming-")
        try:
            try:
                _write_all(fd, data)
                _flush(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages now, so they go
            finally:
                os.close(fd)
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
