"""The log's ML-DSA-65 signing keys, kept in a directory: one JSON file per key, ``key-<n>.json``.

The key with the highest number is the active one (it signs new checkpoints); older keys stay for
verification and stay published, so checkpoints signed before a rotation still verify. Key names
are ``<origin>/key-<n>``. Files hold the private key: they are created mode 0600 in a 0700
directory and a file readable by others is refused at load. A file is written whole to a temporary
name and linked into place, which fails if the name is taken: two processes starting (or rotating)
at once never overwrite each other's key; the loser reloads and uses the winner's.

A running service notices a rotation made by another process (``lucerna audit-keys rotate``, another
worker) through ``refresh``: a listing of the directory at most every ``REFRESH_SECONDS``, done
before each checkpoint is signed and each time the public keys are served.

Private keys never appear in a repr, a log line or ``public_keys()``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pqcrypto.sign import ml_dsa_65

from lucerna.audit.checkpoints import (
    ALGORITHM,
    DEFAULT_ORIGIN,
    PUBLIC_KEY_SIZE,
    CheckpointError,
    TrustedKey,
    check_key_name,
    key_id,
)
from lucerna.core.secret_files import UnsafeSecretFileError, create_secret_file, read_secret_file

log = logging.getLogger(__name__)

_FILE = re.compile(r"key-([1-9][0-9]*)\.json")
_SELF_TEST = b"lucerna audit key self-test\n"
# How stale a running service's view of the key directory may be: a rotation takes effect within it.
REFRESH_SECONDS = 2.0


class KeyringError(RuntimeError):
    """A key file that is unsafe, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class SigningKey:
    """An ML-DSA-65 key pair with its signed-note name and key ID."""

    name: str
    key_id: bytes
    public_key: bytes
    private_key: bytes = field(repr=False)
    created: datetime

    @classmethod
    def generate(cls, name: str, created: datetime | None = None) -> SigningKey:
        """A fresh key pair named ``name``."""
        check_key_name(name)
        public_key, private_key = ml_dsa_65.keygen()
        return cls(name, key_id(name, public_key), public_key, private_key, created or datetime.now(UTC))

    def sign(self, message: bytes) -> bytes:
        """The ML-DSA-65 signature of ``message``."""
        signature: bytes = ml_dsa_65.sign(self.private_key, message)
        return signature

    def trusted(self) -> TrustedKey:
        """The public half, as a verifier pins it."""
        return TrustedKey(self.name, self.key_id, self.public_key)


class Keyring:
    """The signing keys in ``directory``; the first key is created when there is none (unless
    ``create`` is false: an operator's command that only reads)."""

    def __init__(self, directory: Path, origin: str = DEFAULT_ORIGIN, *, create: bool = True) -> None:
        self.directory = directory
        self.origin = origin
        self._keys: dict[int, SigningKey] = {}
        self._listed = time.monotonic()
        self.reload()
        if not self._keys and create:
            self._create(1)

    @property
    def active(self) -> SigningKey:
        """The key that signs new checkpoints (the newest)."""
        keys = self._keys  # one read: ``refresh`` may swap the dict from another thread
        return keys[max(keys)]

    def signing_keys(self) -> list[SigningKey]:
        """Every key, newest first."""
        return [self._keys[n] for n in sorted(self._keys, reverse=True)]

    def rotate(self) -> SigningKey:
        """Make a new key the active one; the old ones stay for verification."""
        self.reload()
        self._create(max(self._keys, default=0) + 1)
        return self.active

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if the directory's key files are not the ones held (a rotation elsewhere); lists
        the directory at most every ``REFRESH_SECONDS`` unless ``force``. Whether the keys changed.
        A new file that cannot be used is logged and the keys held stay in use."""
        now = time.monotonic()
        if not force and now - self._listed < REFRESH_SECONDS:
            return False
        self._listed = now
        try:
            names = [path.name for path in self.directory.iterdir()]
        except OSError as error:
            log.error("audit key directory not readable, %s stays active: %s", self.active.name, error)  # noqa: TRY400 - the reason is the message
            return False
        listed = {int(m.group(1)) for name in names if (m := _FILE.fullmatch(name))}
        if not listed or listed == set(self._keys):
            return False
        try:
            self.reload()
        except KeyringError as error:
            log.error("audit signing keys not reloaded, %s stays active: %s", self.active.name, error)  # noqa: TRY400 - the reason is the message
            return False
        active = self.active
        log.info("audit signing keys reloaded: %s (key ID %s) is active", active.name, active.key_id.hex())
        return True

    def reload(self) -> None:
        """Read the directory again (another process may have rotated)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = {}
        for path in self.directory.iterdir():
            match = _FILE.fullmatch(path.name)
            if match is not None:
                keys[int(match.group(1))] = _load(path)
        self._keys = keys

    def trusted_keys(self) -> list[TrustedKey]:
        """The public halves of every key, newest first."""
        return [key.trusted() for key in self.signing_keys()]

    def public_keys(self) -> list[dict[str, Any]]:
        """Every key's public half as JSON for the well-known URL, newest first."""
        active = self.active.key_id
        return [
            {
                "name": key.name,
                "key_id": key.key_id.hex(),
                "algorithm": ALGORITHM,
                "public_key": base64.b64encode(key.public_key).decode(),
                "created": key.created.isoformat(),
                "active": key.key_id == active,
            }
            for key in self.signing_keys()
        ]

    def _create(self, number: int) -> None:
        key = SigningKey.generate(f"{self.origin}/key-{number}")
        document = {
            "name": key.name,
            "algorithm": ALGORITHM,
            "public_key": base64.b64encode(key.public_key).decode(),
            "private_key": base64.b64encode(key.private_key).decode(),
            "created": key.created.isoformat(),
        }
        path = self.directory / f"key-{number}.json"
        if create_secret_file(path, json.dumps(document, indent=1).encode() + b"\n"):
            log.info("created audit signing key %s (key ID %s)", key.name, key.key_id.hex())
        self.reload()


def parse_public_keys(items: Sequence[dict[str, Any]]) -> list[TrustedKey]:
    """Trusted keys from ``public_keys()`` JSON (pinned by a verifier); refuses a wrong key ID."""
    trusted = []
    for item in items:
        try:
            if item["algorithm"] != ALGORITHM:
                raise CheckpointError(
                    f"key {item['name']}: algorithm {item['algorithm']!r} is not {ALGORITHM}"
                )
            key = TrustedKey.of(item["name"], base64.b64decode(item["public_key"], validate=True))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"a published key is malformed: {error}") from None
        if key.key_id.hex() != item["key_id"]:
            raise CheckpointError(
                f"key {key.name}: published key ID {item['key_id']} is not {key.key_id.hex()}"
            )
        trusted.append(key)
    return trusted


def _load(path: Path) -> SigningKey:
    try:
        content = read_secret_file(path)
    except UnsafeSecretFileError as error:
        raise KeyringError(str(error)) from None
    try:
        return _key_of(json.loads(content))
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # JSON, base64, key: ValueErrors
        raise KeyringError(f"{path} is not a usable {ALGORITHM} key file: {error}") from None


def _key_of(document: dict[str, Any]) -> SigningKey:
    if document["algorithm"] != ALGORITHM:
        raise ValueError(f"algorithm {document['algorithm']!r} is not {ALGORITHM}")
    public_key = base64.b64decode(document["public_key"], validate=True)
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"the public key is {len(public_key)} bytes, not {PUBLIC_KEY_SIZE}")
    name = document["name"]
    check_key_name(name)
    key = SigningKey(
        name,
        key_id(name, public_key),
        public_key,
        base64.b64decode(document["private_key"], validate=True),
        datetime.fromisoformat(document["created"]),
    )
    # A file whose halves do not belong together would sign checkpoints nobody can verify.
    if not key.trusted().verifies(_SELF_TEST, key.sign(_SELF_TEST)):
        raise ValueError("its private key does not match its public key")
    return key
