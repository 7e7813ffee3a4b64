"""Channel identities and trust stores on disk, for ``lucerna.core.pqchannel``.

An identity file is JSON ``{"name", "algorithm": "ML-DSA-65", "public_key", "secret_key"}`` (keys in
base64), created mode 0600 and never overwritten (``secret_files``); one readable by group or others
is refused, and so is one whose halves do not belong together, which would only show later as every
handshake failing. A trust store file is JSON ``{peer name: base64 ML-DSA-65 public key}``: public,
so readable by anyone, but whoever can write it can make a peer trusted.

Secret keys never appear in a repr, a log line or an error message.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

from pqcrypto import InvalidSignatureError
from pqcrypto.sign import ml_dsa_65

from lucerna.core.pqchannel import MAX_NAME_SIZE, Identity, TrustStore
from lucerna.core.secret_files import UnsafeSecretFileError, create_secret_file, read_secret_file

log = logging.getLogger(__name__)

ALGORITHM = "ML-DSA-65"
_SELF_TEST = b"lucerna channel identity self-test\n"
_SELF_TEST_CONTEXT = b"lucerna/pqchannel/v1 key self-test"


class ChannelKeyError(RuntimeError):
    """An identity or trust store file that is unsafe, unreadable or inconsistent; names the file."""


def save_identity(path: Path, identity: Identity) -> bool:
    """Write ``identity`` to a new file at ``path`` (mode 0600); False if the file exists (kept)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = {
        "name": identity.name,
        "algorithm": ALGORITHM,
        "public_key": base64.b64encode(identity.public_key).decode(),
        "secret_key": base64.b64encode(identity.secret_key).decode(),
    }
    return create_secret_file(path, json.dumps(document, indent=1).encode() + b"\n")


def load_identity(path: Path) -> Identity:
    """The identity in ``path``; ``ChannelKeyError`` if it is open to others, malformed or inconsistent."""
    try:
        return _identity_of(json.loads(read_secret_file(path)))
    except UnsafeSecretFileError as error:
        raise ChannelKeyError(str(error)) from None
    except InvalidSignatureError:
        raise ChannelKeyError(f"{path}: its secret key does not match its public key") from None
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as error:
        reason = _reason(error)
        raise ChannelKeyError(f"{path} is not a usable {ALGORITHM} channel identity: {reason}") from None


def load_or_create_identity(path: Path, name: str) -> Identity:
    """The identity in ``path`` (created under ``name`` when there is none); its name must be ``name``."""
    if not path.exists() and save_identity(path, Identity.generate(name)):
        log.info("created channel identity %s in %s", name, path)
    identity = load_identity(path)  # the winner's, if another process created it at the same time
    if identity.name != name:
        raise ChannelKeyError(f"{path} holds the identity {identity.name!r}, expected {name!r}")
    return identity


def load_trust_store(path: Path) -> dict[str, bytes]:
    """The pinned keys in a trust store file: peer name -> ML-DSA-65 public key."""
    try:
        return _trust_store_of(json.loads(path.read_bytes()))
    except (OSError, TypeError, ValueError) as error:
        raise ChannelKeyError(f"{path} is not a usable trust store: {_reason(error)}") from None


def write_trust_store(path: Path, trusted: TrustStore) -> None:
    """Write a trust store file (replaced whole, so a reader never sees half of it)."""
    document = {name: base64.b64encode(key).decode() for name, key in sorted(trusted.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    temporary.replace(path)


def _public_key(encoded: Any) -> bytes:
    key = base64.b64decode(encoded, validate=True)
    if len(key) != ml_dsa_65.PUBLIC_KEY_SIZE:
        raise ValueError(f"a public key is {len(key)} bytes, not {ml_dsa_65.PUBLIC_KEY_SIZE}")
    return key


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME_SIZE:
        raise ValueError(f"peer name {name!r} is not a string of 1 to {MAX_NAME_SIZE} UTF-8 bytes")
    return name


def _reason(error: Exception) -> str:
    # A KeyError's text is only the missing key; say so.
    return f"missing field {error}" if isinstance(error, KeyError) else str(error) or type(error).__name__


def _identity_of(document: dict[str, Any]) -> Identity:
    if document["algorithm"] != ALGORITHM:
        raise ValueError(f"algorithm {document['algorithm']!r} is not {ALGORITHM}")
    identity = Identity(
        _checked_name(document["name"]),
        _public_key(document["public_key"]),
        base64.b64decode(document["secret_key"], validate=True),
    )
    if len(identity.secret_key) != ml_dsa_65.SECRET_KEY_SIZE:
        raise ValueError(f"the secret key is not {ml_dsa_65.SECRET_KEY_SIZE} bytes")
    # Halves that do not belong together would only show later, as every handshake failing.
    signature = identity.sign(_SELF_TEST, _SELF_TEST_CONTEXT)
    ml_dsa_65.verify(identity.public_key, _SELF_TEST, signature, context=_SELF_TEST_CONTEXT)
    return identity


def _trust_store_of(document: Any) -> dict[str, bytes]:
    if not isinstance(document, dict):
        raise TypeError("expected a JSON object of peer name -> base64 public key")
    trusted = {}
    for name, encoded in document.items():
        _checked_name(name)
        if not isinstance(encoded, str):
            raise TypeError(f"the key of {name!r} is not a base64 string")
        try:
            trusted[name] = _public_key(encoded)
        except ValueError as error:
            raise ValueError(f"the key of {name!r}: {error}") from None
    return trusted
