"""Channel identities and trust stores on disk: private files 0600, refused when open to others or
inconsistent; trust stores round-trip; the local keys are shared by both ends of one host."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from lucerna.core.audit_channel import LOCAL_AUDIT_NAME, LOCAL_SERVICES_NAME, local_channel_keys
from lucerna.core.pqchannel import Identity, Initiator, Responder
from lucerna.core.pqchannel_keys import (
    ChannelKeyError,
    load_identity,
    load_or_create_identity,
    load_trust_store,
    save_identity,
    write_trust_store,
)

pytestmark = pytest.mark.unit


def test_an_identity_round_trips_in_a_private_file(tmp_path: Path) -> None:
    identity = Identity.generate("lucerna.test/ingestion")
    path = tmp_path / "keys" / "ingestion.json"
    assert save_identity(path, identity)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_identity(path) == identity
    assert not save_identity(path, Identity.generate("lucerna.test/other"))  # never overwritten
    assert load_identity(path).name == "lucerna.test/ingestion"
    assert identity.secret_key.hex() not in repr(identity)


def test_an_identity_file_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, Identity.generate("lucerna.test/a"))
    path.chmod(0o640)
    with pytest.raises(ChannelKeyError, match=r"accessible to others \(mode 640\); chmod 600"):
        load_identity(path)


def test_an_identity_whose_halves_do_not_match_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, Identity.generate("lucerna.test/a"))
    document = json.loads(path.read_text())
    other = base64.b64encode(Identity.generate("lucerna.test/a").public_key).decode()
    path.write_text(json.dumps({**document, "public_key": other}))
    with pytest.raises(ChannelKeyError, match="its secret key does not match its public key"):
        load_identity(path)
    path.write_text(json.dumps({**document, "algorithm": "Ed25519"}))
    with pytest.raises(ChannelKeyError, match="algorithm 'Ed25519' is not ML-DSA-65"):
        load_identity(path)
    path.write_text(json.dumps({"name": "x", "algorithm": "ML-DSA-65"}))
    with pytest.raises(ChannelKeyError, match="missing field 'public_key'"):
        load_identity(path)
    text = path.read_text()
    assert document["secret_key"] not in text


def test_load_or_create_keeps_the_first_identity_and_checks_its_name(tmp_path: Path) -> None:
    path = tmp_path / "audit.json"
    first = load_or_create_identity(path, "lucerna.test/audit")
    assert load_or_create_identity(path, "lucerna.test/audit") == first
    with pytest.raises(ChannelKeyError, match=r"holds the identity 'lucerna.test/audit', expected 'other'"):
        load_or_create_identity(path, "other")


def test_a_trust_store_round_trips_and_refuses_bad_keys(tmp_path: Path) -> None:
    a, b = Identity.generate("lucerna.test/a"), Identity.generate("lucerna.test/b")
    path = tmp_path / "trusted.json"
    write_trust_store(path, {a.name: a.public_key, b.name: b.public_key})
    assert load_trust_store(path) == {a.name: a.public_key, b.name: b.public_key}
    path.write_text(json.dumps({a.name: "c2hvcnQ="}))
    with pytest.raises(
        ChannelKeyError, match=r"the key of 'lucerna.test/a': a public key is 5 bytes, not 1952"
    ):
        load_trust_store(path)
    path.write_text(json.dumps([a.name]))
    with pytest.raises(ChannelKeyError, match="expected a JSON object"):
        load_trust_store(path)
    with pytest.raises(ChannelKeyError, match="is not a usable trust store"):
        load_trust_store(tmp_path / "missing.json")


def test_local_keys_are_shared_by_both_ends_and_open_a_channel(tmp_path: Path) -> None:
    services_side, audit_side = local_channel_keys(tmp_path), local_channel_keys(tmp_path)
    assert services_side == audit_side
    assert (services_side.audit.name, services_side.services.name) == (LOCAL_AUDIT_NAME, LOCAL_SERVICES_NAME)
    initiator = Initiator(services_side.services, services_side.trusted_by_services(), LOCAL_AUDIT_NAME)
    responder = Responder(audit_side.audit, audit_side.trusted_by_audit())
    message3, client = initiator.finish(responder.respond(initiator.start()))
    server = responder.finish(message3)
    assert server.decrypt(client.encrypt(b"append")) == b"append"
