"""Checkpoints as C2SP signed notes with ML-DSA-65: the exact format, strict parsing, signing and
the signed-note verification rules, and the keyring (files, modes, rotation, published keys)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
import time
from pathlib import Path

import pytest

from lucerna.audit import merkle
from lucerna.audit.checkpoints import (
    DEFAULT_ORIGIN,
    Checkpoint,
    CheckpointError,
    NoteSignature,
    SignedCheckpoint,
    TrustedKey,
    key_id,
    sign,
    verify,
)
from lucerna.audit.keys import Keyring, KeyringError, SigningKey, parse_public_keys

pytestmark = pytest.mark.unit

ROOT = merkle.root([merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")])
ROOT_B64 = base64.b64encode(ROOT).decode()


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate(f"{DEFAULT_ORIGIN}/key-1")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate("witness.example/w1")


# --- Format ----------------------------------------------------------------------------------------


def test_checkpoint_text_is_the_c2sp_body() -> None:
    checkpoint = Checkpoint(DEFAULT_ORIGIN, 2, ROOT)
    assert checkpoint.text() == f"lucerna.local/audit-log\n2\n{ROOT_B64}\n"
    assert Checkpoint.parse(checkpoint.text()) == checkpoint
    assert Checkpoint.parse(f"o\n0\n{base64.b64encode(merkle.EMPTY_ROOT).decode()}\n").size == 0


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"o\n2\n{ROOT_B64}", "does not end with a newline"),
        ("o\n2\n", "2 lines"),
        (f"o\n2\n{ROOT_B64}\next\n", "extension lines"),
        (f"o\n02\n{ROOT_B64}\n", "leading zeros"),
        (f"o\n+2\n{ROOT_B64}\n", "not a decimal"),
        (f"o\n-1\n{ROOT_B64}\n", "not a decimal"),
        (f"o\n2 \n{ROOT_B64}\n", "not a decimal"),
        (f"o\n\N{FULLWIDTH DIGIT TWO}\n{ROOT_B64}\n", "not a decimal"),
        (f"o\n\n{ROOT_B64}\n", "not a decimal"),
        ("o\n2\nnot base64!\n", "not base64"),
        (f"o\n2\n{ROOT_B64.rstrip('=')}\n", "not base64"),
        (f"o\n2\n{base64.b64encode(ROOT[:31]).decode()}\n", "31 bytes"),
        (f"\n2\n{ROOT_B64}\n", "origin ''"),
        (f"my log\n2\n{ROOT_B64}\n", "holds a space"),
        (f"o\t\n2\n{ROOT_B64}\n", "control character"),
        (f"o\r\n2\n{ROOT_B64}\n", "control character"),
    ],
)
def test_malformed_checkpoint_text_is_refused(text: str, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        Checkpoint.parse(text)


def test_non_canonical_base64_is_refused() -> None:
    # The last character of a 32-byte value carries 2 unused bits: setting one keeps the bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    tweaked = ROOT_B64[:42] + alphabet[alphabet.index(ROOT_B64[42]) + 1] + "="
    assert base64.b64decode(tweaked) == ROOT
    with pytest.raises(CheckpointError, match="canonical base64"):
        Checkpoint.parse(f"o\n2\n{tweaked}\n")


def test_signed_note_format(key: SigningKey) -> None:
    checkpoint = Checkpoint(DEFAULT_ORIGIN, 2, ROOT)
    signed = sign(checkpoint, key)
    note = signed.note()
    text, blank, line, end = note.partition("\n\n")[0] + "\n", "\n", note.split("\n")[4], note[-1]
    assert note.startswith(checkpoint.text() + blank)
    assert text == checkpoint.text()
    assert end == "\n"
    assert line.startswith(f"\N{EM DASH} {key.name} ")
    raw = base64.b64decode(line.split(" ")[2])
    assert raw[:4] == key.key_id
    assert len(raw) == 4 + 3309
    assert SignedCheckpoint.parse(note) == signed
    assert SignedCheckpoint.parse(note.encode()) == signed


def test_key_id_is_the_signed_note_recommendation(key: SigningKey) -> None:
    expected = hashlib.sha256(key.name.encode() + b"\n\xffML-DSA-65" + key.public_key).digest()[:4]
    assert key.key_id == expected == key_id(key.name, key.public_key)
    assert len(key.public_key) == 1952


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda n: n.replace("\n\n", "\n"), "no blank line"),
        (lambda n: n[:-1], "does not end with a newline"),
        (lambda n: n.replace("\N{EM DASH} ", "- "), "em dash"),
        (lambda n: n.replace("\N{EM DASH} ", "\N{EM DASH}  "), "not '— <key name>"),
        (lambda n: n.replace("\N{EM DASH} lucerna", "\N{EM DASH} luc+erna"), "holds a space, a '\\+'"),
        (lambda n: n[:-1] + " \n", "not '— <key name>"),
        (lambda n: n.replace("\n\n", "\n\n\N{EM DASH} k AAAA\n"), "too few"),
        (lambda n: n + n.split("\n\n")[1], "two signatures by key"),
        (
            lambda n: (
                n.split("\n\n")[0] + "\n\n" + "".join(f"\N{EM DASH} k{i} AAAAAAA=\n" for i in range(33))
            ),
            "at most",
        ),
        (lambda n: n.replace("\n\n", "\n\x00\n\n"), "control character"),
    ],
)
def test_malformed_signed_notes_are_refused(key: SigningKey, mutate: object, reason: str) -> None:
    note = sign(Checkpoint(DEFAULT_ORIGIN, 2, ROOT), key).note()
    with pytest.raises(CheckpointError, match=reason):
        SignedCheckpoint.parse(mutate(note))  # type: ignore[operator]


def test_invalid_utf8_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not valid UTF-8"):
        SignedCheckpoint.parse(b"o\n2\n\xff\n\n")


# --- Signing and verification ----------------------------------------------------------------------


def test_sign_and_verify(key: SigningKey) -> None:
    checkpoint = Checkpoint(DEFAULT_ORIGIN, 2, ROOT)
    note = sign(checkpoint, key).note()
    assert verify(note, [key.trusted()]) == checkpoint
    assert verify(note.encode(), [key.trusted()], origin=DEFAULT_ORIGIN) == checkpoint
    with pytest.raises(
        CheckpointError, match=re.escape("is of log 'lucerna.local/audit-log', not 'elsewhere'")
    ):
        verify(note, [key.trusted()], origin="elsewhere")


def test_a_wrong_key_does_not_verify(key: SigningKey, other_key: SigningKey) -> None:
    note = sign(Checkpoint(DEFAULT_ORIGIN, 2, ROOT), key).note()
    with pytest.raises(
        CheckpointError, match="no signature by a trusted key; the note is signed by: lucerna"
    ):
        verify(note, [other_key.trusted()])
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        verify(note, [])
    # Same name and ID, another public key: the key is "known", and its signature fails.
    impostor = TrustedKey(key.name, key.key_id, other_key.public_key)
    with pytest.raises(
        CheckpointError, match=f"signature by key {key.name} \\({key.key_id.hex()}\\) does not verify"
    ):
        verify(note, [impostor])


def test_a_flipped_byte_in_the_text_fails(key: SigningKey) -> None:
    note = sign(Checkpoint(DEFAULT_ORIGIN, 2, ROOT), key).note()
    for changed in (note.replace("\n2\n", "\n3\n"), note.replace("audit-log\n", "audit-loh\n")):
        with pytest.raises(CheckpointError, match="does not verify"):
            verify(changed, [key.trusted()])
    other_root = base64.b64encode(bytes([ROOT[0] ^ 1, *ROOT[1:]])).decode()
    with pytest.raises(CheckpointError, match="does not verify"):
        verify(note.replace(ROOT_B64, other_root), [key.trusted()])


def test_a_flipped_byte_in_the_signature_fails(key: SigningKey) -> None:
    signed = sign(Checkpoint(DEFAULT_ORIGIN, 2, ROOT), key)
    good = signed.signatures[0]
    for position in (0, 1000, len(good.signature) - 1):
        raw = bytearray(good.signature)
        raw[position] ^= 0x01
        tampered = SignedCheckpoint(signed.checkpoint, (NoteSignature(good.name, good.key_id, bytes(raw)),))
        with pytest.raises(CheckpointError, match="does not verify"):
            verify(tampered.note(), [key.trusted()])
    truncated = SignedCheckpoint(
        signed.checkpoint, (NoteSignature(good.name, good.key_id, good.signature[:-1]),)
    )
    with pytest.raises(CheckpointError, match="does not verify"):
        verify(truncated.note(), [key.trusted()])
    # A flipped key ID makes the signature an unknown key's: ignored, so nothing verifies.
    other_id = NoteSignature(good.name, bytes([good.key_id[0] ^ 1, *good.key_id[1:]]), good.signature)
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        verify(SignedCheckpoint(signed.checkpoint, (other_id,)).note(), [key.trusted()])


def test_unknown_keys_are_ignored_and_known_failures_reject(key: SigningKey, other_key: SigningKey) -> None:
    checkpoint = Checkpoint(DEFAULT_ORIGIN, 2, ROOT)
    ours, theirs = sign(checkpoint, key).signatures[0], sign(checkpoint, other_key).signatures[0]
    both = SignedCheckpoint(checkpoint, (theirs, ours))
    assert verify(both.note(), [key.trusted()]) == checkpoint  # the witness's key is unknown: ignored
    assert verify(both.note(), [key.trusted(), other_key.trusted()]) == checkpoint
    broken_theirs = NoteSignature(theirs.name, theirs.key_id, ours.signature)
    with pytest.raises(CheckpointError, match=r"witness\.example/w1 .* does not verify"):
        verify(
            SignedCheckpoint(checkpoint, (broken_theirs, ours)).note(), [key.trusted(), other_key.trusted()]
        )
    assert verify(SignedCheckpoint(checkpoint, (broken_theirs, ours)).note(), [key.trusted()]) == checkpoint


def test_verification_is_fast(key: SigningKey) -> None:
    note = sign(Checkpoint(DEFAULT_ORIGIN, 1_000_000, ROOT), key).note()
    trusted = [key.trusted()]
    verify(note, trusted)
    runs = 200
    started = time.perf_counter()
    for _ in range(runs):
        verify(note, trusted)
    per_note = (time.perf_counter() - started) / runs
    assert per_note < 0.002, f"{per_note * 1e6:.0f} µs per checkpoint (parse + ML-DSA-65 verify)"


# --- Keyring ---------------------------------------------------------------------------------------


def test_first_start_creates_a_private_key_file(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    keyring = Keyring(directory, origin="test.local/log")
    files = list(directory.iterdir())
    assert [f.name for f in files] == ["key-1.json"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert keyring.active.name == "test.local/log/key-1"
    assert "private_key" not in repr(keyring.active)
    assert Keyring(directory, origin="test.local/log").active == keyring.active  # loaded, not recreated


def test_rotation_keeps_old_keys_verifiable(tmp_path: Path) -> None:
    keyring = Keyring(tmp_path / "keys")
    first = keyring.active
    old_note = sign(Checkpoint(DEFAULT_ORIGIN, 2, ROOT), first).note()
    second = keyring.rotate()
    assert second.name == f"{DEFAULT_ORIGIN}/key-2"
    assert keyring.active == second != first
    new_note = sign(Checkpoint(DEFAULT_ORIGIN, 3, ROOT), keyring.active).note()
    reloaded = Keyring(tmp_path / "keys")
    assert [k.name for k in reloaded.signing_keys()] == [second.name, first.name]
    for note in (old_note, new_note):
        verify(note, reloaded.trusted_keys())
    published = reloaded.public_keys()
    assert [(p["name"], p["active"]) for p in published] == [(second.name, True), (first.name, False)]
    assert published[1] == {
        "name": first.name,
        "key_id": first.key_id.hex(),
        "algorithm": "ML-DSA-65",
        "public_key": base64.b64encode(first.public_key).decode(),
        "created": first.created.isoformat(),
        "active": False,
    }
    assert "private" not in json.dumps(published)
    pinned = parse_public_keys(json.loads(json.dumps(published)))
    for note in (old_note, new_note):
        verify(note, pinned)


def test_published_keys_with_a_wrong_id_are_refused(tmp_path: Path) -> None:
    published = Keyring(tmp_path / "keys").public_keys()
    published[0]["key_id"] = "00000000"
    with pytest.raises(CheckpointError, match="published key ID 00000000"):
        parse_public_keys(published)
    with pytest.raises(CheckpointError, match="malformed"):
        parse_public_keys([{"name": "x"}])


def test_an_exposed_or_damaged_key_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    Keyring(directory)
    path = directory / "key-1.json"
    path.chmod(0o644)
    with pytest.raises(KeyringError, match="accessible to others"):
        Keyring(directory)
    path.chmod(0o600)
    document = json.loads(path.read_text())
    other = SigningKey.generate("x/key")
    document["public_key"] = base64.b64encode(other.public_key).decode()
    path.write_text(json.dumps(document))
    with pytest.raises(KeyringError, match="does not match its public key"):
        Keyring(directory)
    path.write_text("{")
    with pytest.raises(KeyringError, match="not a usable ML-DSA-65 key file"):
        Keyring(directory)


def test_a_lost_creation_race_uses_the_winners_key(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    first = Keyring(directory)
    second = Keyring(directory)
    first.rotate()
    # ``second`` still believes key 1 is newest; its rotation must not overwrite key 2.
    second._keys = {1: second._keys[1]}
    second._create(2)
    assert second.active == first.active
    assert len(list(directory.glob("key-*.json"))) == 2
    assert not list(directory.glob(".*.tmp"))
