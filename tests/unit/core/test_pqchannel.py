"""The post-quantum channel: hybrid handshake, records, replay window and sealing at rest."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pqcrypto.kem import ml_kem_768
from pqcrypto.sign import ml_dsa_65

from lucerna.core import pqchannel
from lucerna.core.pqchannel import (
    Channel,
    ChannelError,
    Identity,
    Initiator,
    RecipientKeys,
    RecipientPrivateKeys,
    Responder,
    TrustStore,
    open_sealed,
    seal,
)

CLIENT = Identity.generate("lucerna.local/ingestion")
SERVER = Identity.generate("lucerna.local/audit")
TRUSTED: TrustStore = {CLIENT.name: CLIENT.public_key, SERVER.name: SERVER.public_key}

# Where each field of message 2 starts: after the 2-byte header, the X25519 key, then the KEM ciphertext.
M2_X25519 = 2
M2_CIPHERTEXT = M2_X25519 + pqchannel.X25519_SIZE

Tamper = Callable[[bytes], bytes]


def _unchanged(message: bytes) -> bytes:
    return message


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    return data[:index] + bytes((data[index] ^ (1 << bit),)) + data[index + 1 :]


def _handshake(
    client: Identity = CLIENT,
    server: Identity = SERVER,
    client_trusts: TrustStore = TRUSTED,
    server_trusts: TrustStore = TRUSTED,
    on_m1: Tamper = _unchanged,
    on_m2: Tamper = _unchanged,
    on_m3: Tamper = _unchanged,
) -> tuple[Channel, Channel]:
    initiator = Initiator(client, client_trusts, expected_peer=server.name)
    responder = Responder(server, server_trusts)
    message2 = responder.respond(on_m1(initiator.start()))
    message3, client_channel = initiator.finish(on_m2(message2))
    server_channel = responder.finish(on_m3(message3))
    return client_channel, server_channel


def test_sizes_match_pqcrypto() -> None:
    assert pqchannel.KEM_PUBLIC_SIZE == ml_kem_768.PUBLIC_KEY_SIZE
    assert pqchannel.KEM_SECRET_SIZE == ml_kem_768.SECRET_KEY_SIZE
    assert pqchannel.KEM_CIPHERTEXT_SIZE == ml_kem_768.CIPHERTEXT_SIZE
    assert pqchannel.SIGNATURE_SIZE == ml_dsa_65.SIGNATURE_SIZE


def test_handshake_then_records_both_ways() -> None:
    client, server = _handshake()
    assert client.peer == SERVER.name
    assert server.peer == CLIENT.name
    assert client.transcript_hash == server.transcript_hash
    for index in range(5):
        assert server.decrypt(client.encrypt(f"append {index}".encode())) == f"append {index}".encode()
        assert client.decrypt(server.encrypt(f"ack {index}".encode())) == f"ack {index}".encode()
    assert server.decrypt(client.encrypt(b"")) == b""


def test_records_are_not_plaintext_and_never_repeat_a_nonce() -> None:
    client, _ = _handshake()
    first, second = client.encrypt(b"same payload"), client.encrypt(b"same payload")
    assert b"same payload" not in first
    assert first[9:] != second[9:]  # the same plaintext under sequence numbers 0 and 1


def test_each_handshake_gets_fresh_keys() -> None:
    client_a, _ = _handshake()
    _, server_b = _handshake()
    with pytest.raises(ChannelError, match="failed authentication"):
        server_b.decrypt(client_a.encrypt(b"for session a"))


def test_responder_signing_with_another_key_is_refused() -> None:
    impostor = Identity(SERVER.name, SERVER.public_key, Identity.generate("x").secret_key)
    with pytest.raises(ChannelError, match=r"bad signature from peer 'lucerna.local/audit'"):
        _handshake(server=impostor)


def test_initiator_signing_with_another_key_is_refused() -> None:
    impostor = Identity(CLIENT.name, CLIENT.public_key, Identity.generate("x").secret_key)
    with pytest.raises(ChannelError, match=r"bad signature from peer 'lucerna.local/ingestion'"):
        _handshake(client=impostor)


def test_unknown_initiator_is_refused_before_any_work() -> None:
    stranger = Identity.generate("lucerna.local/stranger")
    with pytest.raises(ChannelError, match=r"unknown peer 'lucerna.local/stranger'"):
        Responder(SERVER, TRUSTED).respond(Initiator(stranger, TRUSTED).start())


def test_unknown_responder_is_refused() -> None:
    only_client = {CLIENT.name: CLIENT.public_key}
    with pytest.raises(ChannelError, match=r"unknown peer 'lucerna.local/audit'"):
        _handshake(client_trusts=only_client)


def test_responder_other_than_expected_is_refused() -> None:
    other = Identity.generate("lucerna.local/fhir")
    trusted = {**TRUSTED, other.name: other.public_key}
    initiator = Initiator(CLIENT, trusted, expected_peer=SERVER.name)
    message2 = Responder(other, trusted).respond(initiator.start())
    with pytest.raises(ChannelError, match=r"expected peer 'lucerna.local/audit', got 'lucerna.local/fhir'"):
        initiator.finish(message2)


def test_responder_x25519_key_replaced_in_flight_is_refused() -> None:
    attacker_key = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def swap(message2: bytes) -> bytes:
        return message2[:M2_X25519] + attacker_key + message2[M2_CIPHERTEXT:]

    with pytest.raises(ChannelError, match="bad signature"):
        _handshake(on_m2=swap)


def test_initiator_keys_replaced_in_flight_are_refused() -> None:
    # A man in the middle puts his own ephemeral keys in message 1; the responder signs what it saw,
    # which is not the transcript the initiator holds.
    attacker = Initiator(CLIENT, TRUSTED).start()

    def swap(message1: bytes) -> bytes:
        keys_end = 2 + pqchannel.X25519_SIZE + pqchannel.KEM_PUBLIC_SIZE
        return message1[:2] + attacker[2:keys_end] + message1[keys_end:]

    with pytest.raises(ChannelError, match="bad signature"):
        _handshake(on_m1=swap)


@pytest.mark.parametrize("index", [0, 1, M2_X25519, M2_CIPHERTEXT, M2_CIPHERTEXT + 500, -1], ids=str)
def test_any_altered_byte_of_message_2_is_refused(index: int) -> None:
    with pytest.raises(ChannelError):
        _handshake(on_m2=lambda message: _flip(message, index))


@pytest.mark.parametrize("index", [0, 2, 40, 1230, -1], ids=str)
def test_any_altered_byte_of_message_1_is_refused(index: int) -> None:
    with pytest.raises(ChannelError):
        _handshake(on_m1=lambda message: _flip(message, index))


def test_altered_message_3_is_refused() -> None:
    with pytest.raises(ChannelError, match="bad signature"):
        _handshake(on_m3=lambda message: _flip(message, 100))


def test_truncated_or_padded_messages_are_refused() -> None:
    with pytest.raises(ChannelError, match="truncated"):
        _handshake(on_m2=lambda message: message[:-1])
    with pytest.raises(ChannelError, match="trailing bytes"):
        _handshake(on_m3=lambda message: message + b"\x00")


def test_a_handshake_object_is_single_use() -> None:
    initiator = Initiator(CLIENT, TRUSTED)
    responder = Responder(SERVER, TRUSTED)
    message1 = initiator.start()
    message2 = responder.respond(message1)
    message3, _ = initiator.finish(message2)
    responder.finish(message3)
    with pytest.raises(ChannelError):
        initiator.finish(message2)
    with pytest.raises(ChannelError):
        responder.finish(message3)
    with pytest.raises(ChannelError):
        responder.respond(message1)


def test_replayed_record_is_refused() -> None:
    client, server = _handshake()
    record = client.encrypt(b"append entry 1")
    assert server.decrypt(record) == b"append entry 1"
    with pytest.raises(ChannelError, match="record 0 is a replay"):
        server.decrypt(record)


def test_reordered_records_within_the_window_are_accepted_once() -> None:
    client, server = _handshake()
    records = [client.encrypt(str(index).encode()) for index in range(10)]
    for index in (3, 0, 9, 1, 2, 8, 4, 7, 5, 6):
        assert server.decrypt(records[index]) == str(index).encode()
    for record in records:
        with pytest.raises(ChannelError, match="replay"):
            server.decrypt(record)


def test_record_older_than_the_window_is_refused() -> None:
    client, server = _handshake()
    late = client.encrypt(b"late")
    for _ in range(pqchannel.REPLAY_WINDOW):
        server.decrypt(client.encrypt(b"x"))
    with pytest.raises(ChannelError, match="older than the replay window"):
        server.decrypt(late)


def test_every_flipped_bit_of_a_record_is_refused() -> None:
    client, server = _handshake()
    record = client.encrypt(b"PHI-free audit record")
    for index in range(len(record)):
        for bit in range(8):
            with pytest.raises(ChannelError):
                server.decrypt(_flip(record, index, bit))
    assert server.decrypt(record) == b"PHI-free audit record"  # forgeries did not burn the number


def test_truncated_record_is_refused() -> None:
    client, server = _handshake()
    with pytest.raises(ChannelError, match="truncated"):
        server.decrypt(client.encrypt(b"")[:-1])


def test_record_from_the_other_direction_is_refused() -> None:
    client, server = _handshake()
    with pytest.raises(ChannelError, match="failed authentication"):
        client.decrypt(client.encrypt(b"reflected back to its sender"))
    with pytest.raises(ChannelError, match="failed authentication"):
        server.decrypt(server.encrypt(b"reflected back to its sender"))


def test_sending_key_is_retired_at_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pqchannel, "KEY_BYTE_LIMIT", 10)
    client, server = _handshake()
    server.decrypt(client.encrypt(b"0123456789"))
    with pytest.raises(ChannelError, match="run a new handshake"):
        client.encrypt(b"x")


# -- at rest ------------------------------------------------------------------------------------------

RECIPIENT = RecipientPrivateKeys.generate()
AAD = b"audit-entry:42"


def test_seal_round_trip() -> None:
    blob = seal(RECIPIENT.public, b"patient 123, study 1.2.3", AAD)
    assert blob[0] == pqchannel.VERSION
    assert b"patient 123" not in blob
    assert open_sealed(RECIPIENT, blob, AAD) == b"patient 123, study 1.2.3"
    assert seal(RECIPIENT.public, b"same", AAD) != seal(RECIPIENT.public, b"same", AAD)


def test_recipient_keys_survive_serialisation() -> None:
    restored = RecipientPrivateKeys.from_bytes(RECIPIENT.to_bytes())
    public = RecipientKeys.from_bytes(RECIPIENT.public.to_bytes())
    assert open_sealed(restored, seal(public, b"payload", AAD), AAD) == b"payload"
    with pytest.raises(ChannelError, match="bytes"):
        RecipientKeys.from_bytes(RECIPIENT.public.to_bytes()[:-1])


def test_sealed_for_another_recipient_is_refused() -> None:
    blob = seal(RecipientPrivateKeys.generate().public, b"payload", AAD)
    with pytest.raises(ChannelError, match="failed authentication"):
        open_sealed(RECIPIENT, blob, AAD)


def test_sealed_with_the_wrong_aad_is_refused() -> None:
    blob = seal(RECIPIENT.public, b"payload", AAD)
    with pytest.raises(ChannelError, match="failed authentication"):
        open_sealed(RECIPIENT, blob, b"audit-entry:43")


def test_every_altered_byte_of_a_sealed_blob_is_refused() -> None:
    blob = seal(RECIPIENT.public, b"payload", AAD)
    for index in range(len(blob)):
        with pytest.raises(ChannelError):
            open_sealed(RECIPIENT, _flip(blob, index, index % 8), AAD)


def test_truncated_sealed_blob_is_refused() -> None:
    with pytest.raises(ChannelError, match="truncated"):
        open_sealed(RECIPIENT, seal(RECIPIENT.public, b"", AAD)[:-1], AAD)
