"""Files that hold private keys: created whole with mode 0600, never overwritten, refused when open to others.

Shared by the audit log's signing keys and the channel identities. A file is written to a temporary
name, synced, and linked into place, which fails if the name is taken: two processes creating the
same key at once never overwrite each other's; the loser reads the winner's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


class UnsafeSecretFileError(RuntimeError):
    """A private key file that other users could read; the message names the file and the fix."""


def create_secret_file(path: Path, content: bytes) -> bool:
    """Write ``content`` to ``path`` (mode 0600, synced) unless it exists; False if it did."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name survives a crash
    finally:
        os.close(directory)
    return True


def read_secret_file(path: Path) -> bytes:
    """The bytes of a private key file; ``UnsafeSecretFileError`` if group or others may access it."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise UnsafeSecretFileError(
            f"{path} holds a private key and is accessible to others (mode {mode & 0o777:o}); chmod 600"
        )
    return path.read_bytes()
