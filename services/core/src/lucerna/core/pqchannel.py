"""A post-quantum hybrid secure channel between services, and hybrid sealing of data at rest.

Transport-agnostic: every function takes and returns bytes; a transport (gRPC, HTTP) carries them.

Handshake (three messages, initiator I and responder R, each with a pinned ML-DSA-65 identity key)::

    m1  I -> R  01 01 | X25519 eph pub (32) | ML-KEM-768 eph pub (1184) | nonce (32) | len (1) | name_I
    m2  R -> I  01 02 | X25519 eph pub (32) | ML-KEM-768 ct (1088) | len (1) | name_R | sig_R (3309)
    m3  I -> R  01 03 | sig_I (3309)

``sig_R`` = ML-DSA-65 over SHA-256(m1 || m2 without sig_R), FIPS 204 context ``lucerna/pqchannel/v1 R``;
``sig_I`` = ML-DSA-65 over TH = SHA-256(m1 || m2), context ``lucerna/pqchannel/v1 I``. Each signature
covers both names and all ephemeral keys, so neither can be replayed to another peer or session, and
the distinct contexts stop a signature made in one role being used in the other. A peer is accepted only
under a name in the trust store, verified with the key pinned for that name.

Key schedule: ``PRK = HKDF-Extract(salt=TH, IKM = ss_ML-KEM || ss_X25519)`` (the order of the TLS
X25519MLKEM768 hybrid), then ``HKDF-Expand(PRK, label || TH)`` with one label per direction and purpose
(``i2r key``, ``i2r iv``, ``r2i key``, ``r2i iv``): a 32-byte AES-256-GCM key and a 12-byte IV each way.
The channel is secure while either X25519 or ML-KEM-768 is unbroken. There is no separate Finished
MAC: the responder is confirmed by sig_R, and its possession of the keys by the first record it sends.

Records: ``01 | seq (8, big-endian) | AES-256-GCM ciphertext and tag``; the nonce is the direction's IV
XOR the sequence number (as in TLS 1.3), so it never repeats under one key, and the 9-byte header is the
AAD. Choice: a replay *window* (RFC 4303 §3.4.3 anti-replay, 64 records wide), not strict order, because
the transports carry concurrent requests that may arrive reordered; a sequence number already seen or
older than the window is refused, and a number is recorded only once its record authenticates, so a
forgery cannot burn it. A direction's key is retired after ``KEY_BYTE_LIMIT`` bytes (the
AES-GCM usage margin of RFC 8446 §5.5); the caller then runs a new handshake.

At rest: ``seal`` encapsulates to a static recipient key pair with the same hybrid (fresh ephemeral
X25519 + ML-KEM-768 encapsulation per blob) and encrypts with AES-256-GCM; the blob is
``01 | X25519 eph pub (32) | ML-KEM ct (1088) | nonce (12) | ciphertext and tag``. The key is
``HKDF-SHA256(IKM = ss_ML-KEM || ss_X25519, info = label || SHA-256(01 | eph pub | ct | recipient keys))``
and the GCM AAD is ``01 | eph pub | ct | nonce | aad``, so the blob opens only for that recipient and aad.

Not covered: in-session rekeying, key erasure from memory (Python cannot guarantee it), and
revocation beyond removing a name from the trust store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pqcrypto import InvalidSignatureError
from pqcrypto.kem import ml_kem_768
from pqcrypto.sign import ml_dsa_65

VERSION = 1
_MSG_INIT, _MSG_RESPONSE, _MSG_FINISH = 1, 2, 3

X25519_SIZE = 32
KEM_PUBLIC_SIZE = 1184
KEM_SECRET_SIZE = 2400
KEM_CIPHERTEXT_SIZE = 1088
SIGNATURE_SIZE = 3309
HANDSHAKE_NONCE_SIZE = 32
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
MAX_NAME_SIZE = 255

REPLAY_WINDOW = 64
# RFC 8446 §5.5 allows 2^24.5 full-size (2^14-byte) records per AES-GCM key, about 2^38.5 bytes.
KEY_BYTE_LIMIT = 2**38

_SIG_CONTEXT_RESPONDER = b"lucerna/pqchannel/v1 R"
_SIG_CONTEXT_INITIATOR = b"lucerna/pqchannel/v1 I"
_LABEL = b"lucerna/pqchannel/v1 "
_SEAL_LABEL = b"lucerna/pqseal/v1"

_RECORD_HEADER_SIZE = 1 + 8
_SEAL_HEADER_SIZE = 1 + X25519_SIZE + KEM_CIPHERTEXT_SIZE + GCM_NONCE_SIZE
_MAX_SEQUENCE = 2**64 - 1


class ChannelError(Exception):
    """A handshake, record or sealed blob that must not be trusted; the message says why."""


@dataclass(frozen=True)
class Identity:
    """A named long-term ML-DSA-65 key pair that authenticates one end of a channel."""

    name: str
    public_key: bytes
    secret_key: bytes = field(repr=False)

    @classmethod
    def generate(cls, name: str) -> Identity:
        """A fresh identity under ``name``."""
        public_key, secret_key = ml_dsa_65.keygen()
        return cls(_checked_name(name), public_key, secret_key)

    def sign(self, message: bytes, context: bytes) -> bytes:
        """An ML-DSA-65 signature over ``message`` in the FIPS 204 ``context``."""
        signature: bytes = ml_dsa_65.sign(self.secret_key, message, context=context)
        return signature


# Peer name -> pinned ML-DSA-65 public key.
TrustStore = Mapping[str, bytes]


def _checked_name(name: str) -> str:
    size = len(name.encode())
    if not 0 < size <= MAX_NAME_SIZE:
        raise ChannelError(f"a peer name must be 1 to {MAX_NAME_SIZE} UTF-8 bytes, got {size}")
    return name


def _verify_peer(trusted: TrustStore, name: str, message: bytes, signature: bytes, context: bytes) -> None:
    public_key = trusted.get(name)
    if public_key is None:
        raise ChannelError(f"unknown peer {name!r}: no pinned key for that name")
    try:
        ml_dsa_65.verify(public_key, message, signature, context=context)
    except (InvalidSignatureError, ValueError) as error:
        raise ChannelError(f"bad signature from peer {name!r}: not made with its pinned key") from error


class _Reader:
    """Strict parser of a fixed-layout message: every field present, nothing left over."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._data):
            raise ChannelError(f"{self._what} is truncated")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def name(self) -> str:
        raw = self.take(self.take(1)[0])
        try:
            return _checked_name(raw.decode())
        except UnicodeDecodeError as error:
            raise ChannelError(f"{self._what} carries a peer name that is not UTF-8") from error

    def header(self, kind: int) -> None:
        if self.take(2) != bytes((VERSION, kind)):
            raise ChannelError(f"{self._what}: unexpected version or message type")

    def end(self) -> None:
        if self._at != len(self._data):
            raise ChannelError(f"{self._what} has {len(self._data) - self._at} trailing bytes")


def _x25519(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise ChannelError("peer X25519 public key is invalid") from error


def _encapsulate(public_key: bytes, whose: str) -> tuple[bytes, bytes]:
    try:
        ciphertext, secret = ml_kem_768.encaps(public_key)
    except ValueError as error:  # pqcrypto checks the key's length and encoding
        raise ChannelError(f"{whose} ML-KEM-768 public key is invalid") from error
    return bytes(ciphertext), bytes(secret)


def _decapsulate(secret_key: bytes, ciphertext: bytes) -> bytes:
    # ML-KEM decapsulation of a well-formed ciphertext never fails (implicit rejection): a wrong key or an
    # altered ciphertext yields an unrelated secret, which the AEAD or the signed transcript then refuses.
    try:
        return bytes(ml_kem_768.decaps(secret_key, ciphertext))
    except ValueError as error:  # only a key or ciphertext of the wrong length gets here
        raise ChannelError("ML-KEM-768 secret key or ciphertext has the wrong length") from error


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Channel:
    """An established session: ``encrypt`` for the peer, ``decrypt`` what the peer sent.

    Safe to share between threads; each direction's sequence number and replay window sit under a lock.
    """

    def __init__(
        self, peer: str, transcript_hash: bytes, send: tuple[bytes, bytes], receive: tuple[bytes, bytes]
    ) -> None:
        self.peer = peer
        self.transcript_hash = transcript_hash
        self._send_aead, self._send_iv = AESGCM(send[0]), send[1]
        self._receive_aead, self._receive_iv = AESGCM(receive[0]), receive[1]
        self._next_sequence = 0
        self._sent_bytes = 0
        self._highest = -1  # highest authenticated sequence number received
        self._seen = 0  # bit i set: sequence number (highest - i) was received
        self._send_lock = threading.Lock()
        self._receive_lock = threading.Lock()

    @staticmethod
    def _nonce(iv: bytes, sequence: int) -> bytes:
        return (int.from_bytes(iv, "big") ^ sequence).to_bytes(GCM_NONCE_SIZE, "big")

    def encrypt(self, plaintext: bytes) -> bytes:
        """One record carrying ``plaintext``, under the next sequence number."""
        with self._send_lock:
            if self._next_sequence > _MAX_SEQUENCE or self._sent_bytes + len(plaintext) > KEY_BYTE_LIMIT:
                raise ChannelError("this channel's sending key is used up; run a new handshake")
            sequence = self._next_sequence
            self._next_sequence += 1
            self._sent_bytes += len(plaintext)
        header = bytes((VERSION,)) + sequence.to_bytes(8, "big")
        return header + self._send_aead.encrypt(self._nonce(self._send_iv, sequence), plaintext, header)

    def decrypt(self, record: bytes) -> bytes:
        """The plaintext of a record from the peer; replayed, stale or forged records raise."""
        if len(record) < _RECORD_HEADER_SIZE + GCM_TAG_SIZE:
            raise ChannelError("record is truncated")
        header = record[:_RECORD_HEADER_SIZE]
        if header[0] != VERSION:
            raise ChannelError(f"record has unsupported version {header[0]}")
        sequence = int.from_bytes(header[1:], "big")
        with self._receive_lock:
            # Checked and recorded under one lock, so two threads cannot both accept the same record.
            self._check_fresh(sequence)
            try:
                plaintext = self._receive_aead.decrypt(
                    self._nonce(self._receive_iv, sequence), record[_RECORD_HEADER_SIZE:], header
                )
            except InvalidTag as error:
                raise ChannelError(f"record {sequence} failed authentication") from error
            self._mark_seen(sequence)
        return plaintext

    def _check_fresh(self, sequence: int) -> None:
        if sequence > self._highest:
            return
        age = self._highest - sequence
        if age >= REPLAY_WINDOW:
            raise ChannelError(f"record {sequence} is older than the replay window")
        if (self._seen >> age) & 1:
            raise ChannelError(f"record {sequence} is a replay")

    def _mark_seen(self, sequence: int) -> None:
        if sequence > self._highest:
            # A jump past the window forgets everything older; capping the shift keeps the bitmap small.
            shift = min(sequence - self._highest, REPLAY_WINDOW)
            self._seen = ((self._seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self._highest = sequence
        else:
            self._seen |= 1 << (self._highest - sequence)


class Initiator:
    """The side that opens a channel: ``start`` -> send m1; ``finish(m2)`` -> send m3, use the channel."""

    def __init__(self, identity: Identity, trusted: TrustStore, expected_peer: str | None = None) -> None:
        self._identity = identity
        self._trusted = trusted
        self._expected_peer = expected_peer
        self._x25519 = X25519PrivateKey.generate()
        self._kem_public, self._kem_secret = ml_kem_768.keygen()
        self._message1: bytes | None = None
        self._done = False

    def start(self) -> bytes:
        """Message 1: ephemeral X25519 and ML-KEM-768 public keys, a nonce and this side's name."""
        if self._message1 is not None:
            raise ChannelError("handshake already started")
        name = self._identity.name.encode()
        self._message1 = b"".join(
            (
                bytes((VERSION, _MSG_INIT)),
                _raw_public(self._x25519),
                self._kem_public,
                os.urandom(HANDSHAKE_NONCE_SIZE),
                bytes((len(name),)),
                name,
            )
        )
        return self._message1

    def finish(self, message2: bytes) -> tuple[bytes, Channel]:
        """Verify the responder's message 2; return message 3 and the established channel."""
        if self._message1 is None or self._done:
            raise ChannelError("finish() needs exactly one start() before it")
        self._done = True
        reader = _Reader(message2, "handshake message 2")
        reader.header(_MSG_RESPONSE)
        peer_x25519 = reader.take(X25519_SIZE)
        ciphertext = reader.take(KEM_CIPHERTEXT_SIZE)
        peer = reader.name()
        signed_part = message2[: len(message2) - SIGNATURE_SIZE]
        signature = reader.take(SIGNATURE_SIZE)
        reader.end()
        if self._expected_peer is not None and peer != self._expected_peer:
            raise ChannelError(f"expected peer {self._expected_peer!r}, got {peer!r}")
        _verify_peer(
            self._trusted,
            peer,
            hashlib.sha256(self._message1 + signed_part).digest(),
            signature,
            _SIG_CONTEXT_RESPONDER,
        )
        transcript_hash = hashlib.sha256(self._message1 + message2).digest()
        shared = _decapsulate(self._kem_secret, ciphertext) + _x25519(self._x25519, peer_x25519)
        message3 = bytes((VERSION, _MSG_FINISH)) + self._identity.sign(
            transcript_hash, _SIG_CONTEXT_INITIATOR
        )
        return message3, _derive_channel(peer, shared, transcript_hash, initiator=True)


class Responder:
    """The side that accepts a channel: ``respond(m1)`` -> send m2; ``finish(m3)`` -> use the channel."""

    def __init__(self, identity: Identity, trusted: TrustStore) -> None:
        self._identity = identity
        self._trusted = trusted
        self._pending: tuple[str, bytes, bytes] | None = None  # peer, transcript hash, shared secret
        self._done = False

    def respond(self, message1: bytes) -> bytes:
        """Message 2 in reply to the initiator's message 1; an unknown initiator name is refused here."""
        if self._pending is not None or self._done:
            raise ChannelError("respond() may be called once per Responder")
        reader = _Reader(message1, "handshake message 1")
        reader.header(_MSG_INIT)
        peer_x25519 = reader.take(X25519_SIZE)
        peer_kem = reader.take(KEM_PUBLIC_SIZE)
        reader.take(HANDSHAKE_NONCE_SIZE)
        peer = reader.name()
        reader.end()
        if peer not in self._trusted:
            raise ChannelError(f"unknown peer {peer!r}: no pinned key for that name")
        x25519 = X25519PrivateKey.generate()
        x25519_secret = _x25519(x25519, peer_x25519)
        ciphertext, kem_secret = _encapsulate(peer_kem, "peer")
        name = self._identity.name.encode()
        signed_part = b"".join(
            (bytes((VERSION, _MSG_RESPONSE)), _raw_public(x25519), ciphertext, bytes((len(name),)), name)
        )
        signature = self._identity.sign(
            hashlib.sha256(message1 + signed_part).digest(), _SIG_CONTEXT_RESPONDER
        )
        message2 = signed_part + signature
        self._pending = (peer, hashlib.sha256(message1 + message2).digest(), kem_secret + x25519_secret)
        return message2

    def finish(self, message3: bytes) -> Channel:
        """Verify the initiator's signature in message 3; return the established channel."""
        if self._pending is None:
            raise ChannelError("finish() needs a respond() before it, and may be called once")
        peer, transcript_hash, shared = self._pending
        self._pending = None
        self._done = True
        reader = _Reader(message3, "handshake message 3")
        reader.header(_MSG_FINISH)
        signature = reader.take(SIGNATURE_SIZE)
        reader.end()
        _verify_peer(self._trusted, peer, transcript_hash, signature, _SIG_CONTEXT_INITIATOR)
        return _derive_channel(peer, shared, transcript_hash, initiator=False)


def _derive_channel(peer: str, shared: bytes, transcript_hash: bytes, *, initiator: bool) -> Channel:
    # HKDF-Extract with the transcript hash as salt, then one Expand per direction and purpose whose info
    # also carries the transcript hash, so every key is bound to this exact handshake.
    prk = _hkdf_extract(transcript_hash, shared)

    def expand(label: bytes, size: int) -> bytes:
        return HKDFExpand(hashes.SHA256(), size, _LABEL + label + transcript_hash).derive(prk)

    i2r = (expand(b"i2r key", 32), expand(b"i2r iv", GCM_NONCE_SIZE))
    r2i = (expand(b"r2i key", 32), expand(b"r2i iv", GCM_NONCE_SIZE))
    return Channel(peer, transcript_hash, *((i2r, r2i) if initiator else (r2i, i2r)))


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    # RFC 5869 Extract is HMAC(salt, IKM); cryptography exposes it only fused with Expand.
    return hmac.new(salt, ikm, hashlib.sha256).digest()


# -- at rest ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientKeys:
    """A static recipient's public keys for ``seal``: X25519 and ML-KEM-768."""

    x25519: bytes
    kem: bytes

    def to_bytes(self) -> bytes:
        """The keys as one string: X25519 (32) then ML-KEM-768 (1184)."""
        return self.x25519 + self.kem

    @classmethod
    def from_bytes(cls, data: bytes) -> RecipientKeys:
        """Keys from ``to_bytes`` output."""
        if len(data) != X25519_SIZE + KEM_PUBLIC_SIZE:
            raise ChannelError(f"recipient public keys must be {X25519_SIZE + KEM_PUBLIC_SIZE} bytes")
        return cls(data[:X25519_SIZE], data[X25519_SIZE:])


@dataclass(frozen=True)
class RecipientPrivateKeys:
    """A static recipient's key pairs for ``open_sealed``; keep ``to_bytes`` output secret."""

    x25519: bytes
    kem: bytes
    public: RecipientKeys

    @classmethod
    def generate(cls) -> RecipientPrivateKeys:
        """A fresh X25519 + ML-KEM-768 recipient."""
        x25519 = X25519PrivateKey.generate()
        kem_public, kem_secret = ml_kem_768.keygen()
        raw = x25519.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(raw, kem_secret, RecipientKeys(_raw_public(x25519), kem_public))

    def to_bytes(self) -> bytes:
        """The private and public keys as one string, for a secret store."""
        return self.x25519 + self.kem + self.public.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> RecipientPrivateKeys:
        """Keys from ``to_bytes`` output."""
        secret_size = X25519_SIZE + KEM_SECRET_SIZE
        if len(data) != secret_size + X25519_SIZE + KEM_PUBLIC_SIZE:
            raise ChannelError("recipient private keys have the wrong length")
        return cls(
            data[:X25519_SIZE], data[X25519_SIZE:secret_size], RecipientKeys.from_bytes(data[secret_size:])
        )


def _seal_key(shared: bytes, header: bytes, recipient: RecipientKeys) -> bytes:
    # The info binds the ephemeral key, the KEM ciphertext and the recipient's keys (as X-Wing does), so
    # the key belongs to this blob and this recipient only.
    context = hashlib.sha256(header + recipient.to_bytes()).digest()
    return HKDF(hashes.SHA256(), 32, None, _SEAL_LABEL + context).derive(shared)


def seal(recipient_public: RecipientKeys, plaintext: bytes, aad: bytes) -> bytes:
    """``plaintext`` encrypted to the recipient with hybrid X25519 + ML-KEM-768; ``aad`` is bound too."""
    ephemeral = X25519PrivateKey.generate()
    x25519_secret = _x25519(ephemeral, recipient_public.x25519)
    ciphertext, kem_secret = _encapsulate(recipient_public.kem, "recipient")
    header = bytes((VERSION,)) + _raw_public(ephemeral) + ciphertext
    nonce = os.urandom(GCM_NONCE_SIZE)
    key = _seal_key(kem_secret + x25519_secret, header, recipient_public)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header + nonce + aad)


def open_sealed(recipient_private: RecipientPrivateKeys, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of a ``seal`` blob; a wrong key, wrong ``aad`` or altered blob raises."""
    if len(blob) < _SEAL_HEADER_SIZE + GCM_TAG_SIZE:
        raise ChannelError("sealed blob is truncated")
    if blob[0] != VERSION:
        raise ChannelError(f"sealed blob has unsupported version {blob[0]}")
    header = blob[: 1 + X25519_SIZE + KEM_CIPHERTEXT_SIZE]
    nonce = blob[len(header) : _SEAL_HEADER_SIZE]
    ephemeral = blob[1 : 1 + X25519_SIZE]
    ciphertext = blob[1 + X25519_SIZE : len(header)]
    x25519_secret = _x25519(X25519PrivateKey.from_private_bytes(recipient_private.x25519), ephemeral)
    kem_secret = _decapsulate(recipient_private.kem, ciphertext)
    key = _seal_key(kem_secret + x25519_secret, header, recipient_private.public)
    try:
        return AESGCM(key).decrypt(nonce, blob[_SEAL_HEADER_SIZE:], header + nonce + aad)
    except InvalidTag as error:
        raise ChannelError("sealed blob failed authentication: wrong key, wrong AAD or altered") from error
