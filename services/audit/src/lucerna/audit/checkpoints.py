"""Checkpoints: the log's signed tree heads, as C2SP tlog-checkpoint notes signed per C2SP signed-note.

The note text is ``<origin>\\n<tree size>\\n<base64 root hash>\\n`` (this log writes no extension
lines and refuses them); each signature line is ``— <key name> <base64(key ID || signature)>``,
the signature an ML-DSA-65 one (FIPS 204, pure, empty context) over the text's UTF-8 bytes. The key
ID is ``SHA-256(name || 0x0A || 0xFF || "ML-DSA-65" || public key)[:4]``: type byte 0xFF is
signed-note's "no assigned byte, a longer identifier follows".

Parsing is strict (canonical decimal and base64, no stray whitespace or control characters), so a
parsed note's text is byte-for-byte the text that was signed. Verification follows signed-note:
signatures by unknown keys are ignored, one that fails from a known key rejects the note, and a
note with no verified signature from a known key is rejected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pqcrypto.sign import ml_dsa_65

from lucerna.audit.merkle import HASH_SIZE

ALGORITHM = "ML-DSA-65"
SIGNATURE_TYPE = b"\xff" + ALGORITHM.encode()
DEFAULT_ORIGIN = "lucerna.local/audit-log"
KEY_ID_SIZE = 4
SIGNATURE_SIZE = 3309  # ML-DSA-65
PUBLIC_KEY_SIZE = 1952
MAX_SIGNATURES = 32  # signed-note: verifiers must accept at least 16
_DASH = "\N{EM DASH} "


class CheckpointError(ValueError):
    """A checkpoint or signed note that is malformed or does not verify; the message says what failed."""


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte signed-note key ID of an ML-DSA-65 key."""
    return hashlib.sha256(name.encode() + b"\n" + SIGNATURE_TYPE + public_key).digest()[:KEY_ID_SIZE]


def check_key_name(name: str) -> None:
    """Refuse a key name signed-note does not allow (empty, or holding a space or ``+``)."""
    if not name or any(ch.isspace() or ch == "+" or ord(ch) < 0x20 for ch in name):
        raise CheckpointError(f"key name {name!r} is empty or holds a space, a '+' or a control character")


class Signer(Protocol):
    """A private key that signs notes (``keys.SigningKey``)."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class TrustedKey:
    """A public key a verifier trusts: its name, key ID and ML-DSA-65 public key."""

    name: str
    key_id: bytes
    public_key: bytes

    @classmethod
    def of(cls, name: str, public_key: bytes) -> TrustedKey:
        """The trusted key for ``name`` and ``public_key``, its ID computed."""
        check_key_name(name)
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise CheckpointError(
                f"an {ALGORITHM} public key is {PUBLIC_KEY_SIZE} bytes, not {len(public_key)}"
            )
        return cls(name, key_id(name, public_key), public_key)

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is this key's over ``message``."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            ml_dsa_65.verify(self.public_key, message, signature)
        except ValueError:  # pqcrypto's InvalidSignatureError is one
            return False
        return True


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: the log's origin, its size and the root hash at that size."""

    origin: str
    size: int
    root: bytes

    def __post_init__(self) -> None:
        if not self.origin or any(ch.isspace() or ch == "+" or ord(ch) < 0x20 for ch in self.origin):
            raise CheckpointError(
                f"origin {self.origin!r} is empty or holds a space, a '+' or a control character"
            )
        if self.size < 0:
            raise CheckpointError(f"tree size {self.size} is negative")
        if len(self.root) != HASH_SIZE:
            raise CheckpointError(f"the root hash is {len(self.root)} bytes, not {HASH_SIZE}")

    def text(self) -> str:
        """The note text that is signed."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """The checkpoint of a note text (without signatures); ``CheckpointError`` if malformed."""
        _check_characters(text)
        if not text.endswith("\n"):
            raise CheckpointError("the checkpoint text does not end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(f"the checkpoint text has {len(lines)} lines, not 3 (origin, size, root)")
        if len(lines) > 3:
            raise CheckpointError("the checkpoint text has extension lines, which this log never writes")
        origin, size_text, root_text = lines
        if not size_text.isascii() or not size_text.isdigit() or (size_text != "0" and size_text[0] == "0"):
            raise CheckpointError(f"tree size {size_text!r} is not a decimal number without leading zeros")
        root = _b64decode(root_text, "root hash")
        checkpoint = cls(origin, int(size_text), root)
        if checkpoint.text() != text:  # pragma: no cover - guaranteed by the checks above
            raise CheckpointError("the checkpoint text is not in canonical form")
        return checkpoint


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the key name, its key ID and the ML-DSA-65 signature."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        """``— <name> <base64(key ID || signature)>`` with its newline."""
        return f"{_DASH}{self.name} {base64.b64encode(self.key_id + self.signature).decode()}\n"


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint with its signatures: the C2SP signed note."""

    checkpoint: Checkpoint
    signatures: tuple[NoteSignature, ...]

    def note(self) -> str:
        """The signed note's text: the checkpoint text, a blank line, one line per signature."""
        return self.checkpoint.text() + "\n" + "".join(s.line() for s in self.signatures)

    @classmethod
    def parse(cls, note: str | bytes) -> SignedCheckpoint:
        """A signed note's checkpoint and signature lines (unverified); ``CheckpointError`` if malformed."""
        if isinstance(note, bytes):
            try:
                note = note.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CheckpointError(
                    f"the note is not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from None
        _check_characters(note)
        if not note.endswith("\n"):
            raise CheckpointError("the note does not end with a newline")
        split = note.rfind("\n\n")
        if split < 0:
            raise CheckpointError("the note has no blank line before its signatures")
        checkpoint = Checkpoint.parse(note[: split + 1])
        lines = note[split + 2 : -1].split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise CheckpointError(f"the note has {len(lines)} signatures; at most {MAX_SIGNATURES} are read")
        signatures = tuple(_signature(number, line) for number, line in enumerate(lines, 1))
        seen = set()
        for signature in signatures:
            if (signature.name, signature.key_id) in seen:
                raise CheckpointError(
                    f"the note has two signatures by key {signature.name} ({signature.key_id.hex()})"
                )
            seen.add((signature.name, signature.key_id))
        return cls(checkpoint, signatures)


def sign(checkpoint: Checkpoint, signer: Signer) -> SignedCheckpoint:
    """The checkpoint signed by ``signer``."""
    check_key_name(signer.name)
    signature = signer.sign(checkpoint.text().encode())
    return SignedCheckpoint(checkpoint, (NoteSignature(signer.name, signer.key_id, signature),))


def verify(
    note: str | bytes | SignedCheckpoint, trusted: Iterable[TrustedKey], *, origin: str | None = None
) -> Checkpoint:
    """The checkpoint of a signed note that a trusted key signed (and, given ``origin``, of that
    log); ``CheckpointError`` naming what failed otherwise."""
    signed = note if isinstance(note, SignedCheckpoint) else SignedCheckpoint.parse(note)
    if origin is not None and signed.checkpoint.origin != origin:
        raise CheckpointError(f"the checkpoint is of log {signed.checkpoint.origin!r}, not {origin!r}")
    known = {(key.name, key.key_id): key for key in trusted}
    message = signed.checkpoint.text().encode()
    verified = []
    for signature in signed.signatures:
        key = known.get((signature.name, signature.key_id))
        if key is None:
            continue  # signed-note: a signature by an unknown key is ignored
        if not key.verifies(message, signature.signature):
            raise CheckpointError(
                f"the signature by key {signature.name} ({signature.key_id.hex()}) does not verify"
                f" over checkpoint {signed.checkpoint.origin} size {signed.checkpoint.size}"
            )
        verified.append(signature)
    if not verified:
        names = ", ".join(f"{s.name} ({s.key_id.hex()})" for s in signed.signatures)
        raise CheckpointError(f"no signature by a trusted key; the note is signed by: {names}")
    return signed.checkpoint


def _check_characters(text: str) -> None:
    for position, ch in enumerate(text):
        if ord(ch) < 0x20 and ch != "\n":
            raise CheckpointError(f"the note holds control character {ch!r} at position {position}")


def _b64decode(text: str, what: str) -> bytes:
    try:
        value = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise CheckpointError(f"the {what} is not base64: {text[:60]!r}") from None
    if base64.b64encode(value).decode() != text:
        raise CheckpointError(f"the {what} is not in canonical base64: {text[:60]!r}")
    return value


def _signature(number: int, line: str) -> NoteSignature:
    if not line.startswith(_DASH):
        raise CheckpointError(f"signature line {number} does not start with an em dash and a space")
    parts = line[len(_DASH) :].split(" ")
    if len(parts) != 2:
        raise CheckpointError(f"signature line {number} is not '— <key name> <base64 signature>'")
    name, encoded = parts
    check_key_name(name)
    raw = _b64decode(encoded, f"signature of line {number}")
    if len(raw) <= KEY_ID_SIZE:
        raise CheckpointError(
            f"signature line {number} holds {len(raw)} bytes, too few for a key ID and a signature"
        )
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])
