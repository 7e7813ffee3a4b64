"""Key rotation for operators: `lucerna audit-keys list|rotate [--phi]`; a running audit service signs
with a rotated key without a restart and publishes it; the anchorer registers it with the ledger
before anchoring a checkpoint it signed; PHI sealed before and after a PHI key rotation opens, and a
search by patient finds both (the blind index has its own key, which never rotates)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lucerna.audit import keys as keys_module
from lucerna.audit import phi as phi_module
from lucerna.audit.anchoring import Anchorer, SqliteAnchorStore
from lucerna.audit.checkpoints import Checkpoint, SignedCheckpoint, sign, verify
from lucerna.audit.keys import Keyring, parse_public_keys
from lucerna.audit.log import LogEntry, SqliteAuditLog
from lucerna.audit.phi import INDEX_KEY_FILE, KEY_FILE, PhiKeys, split_phi
from lucerna.audit.service import AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.core.cli import main
from lucerna.core.events import codec
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.core.http import create_app
from lucerna.core.pqchannel import ChannelError, RecipientPrivateKeys, seal
from lucerna.core.secret_files import create_secret_file
from lucerna.core.service import Resources
from lucerna.events.v1 import events_pb2
from tests.unit.audit.test_anchoring import ORIGIN, FakeLedger
from tests.unit.orchestrator.kit import embedded_resources

pytestmark = pytest.mark.unit

PATIENT = "Patient/5d1e0c7a9b8f4e3d2c1b0a9f8e7d6c5b"


def access(n: int) -> events_pb2.AuditRecord:
    return events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.PATIENT_DATA_READ,
        service="fhir",
        at=datetime(2026, 11, 21, 10, 0, n, tzinfo=UTC),
        actor="ehr@hospital.example",
        patient=PATIENT,
        query=f"/fhir/DiagnosticReport?patient={PATIENT}&n={n}",
        subtype="search-type",
        entities=[f"DiagnosticReport/r{n}"],
    )


def keys_command(*args: str) -> int:
    return main(["audit-keys", *args])


# --- the operator's commands -------------------------------------------------------------------


def test_list_shows_every_key_and_rotate_makes_a_new_one_active(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir = tmp_path / "keys"
    Keyring(key_dir, ORIGIN)
    PhiKeys.load_or_create(key_dir)

    assert keys_command("rotate", "--key-dir", str(key_dir)) == 0
    rotated = capsys.readouterr().out
    assert f"{ORIGIN}/key-2" in rotated and "without a restart" in rotated
    assert keys_command("rotate", "--phi", "--key-dir", str(key_dir)) == 0
    assert "phi-key-2" in capsys.readouterr().out

    assert keys_command("list", "--json", "--key-dir", str(key_dir)) == 0
    listed = json.loads(capsys.readouterr().out)
    summary = [(row["kind"], row["name"], row["active"]) for row in listed]
    assert summary == [
        ("signing", f"{ORIGIN}/key-2", True),
        ("signing", f"{ORIGIN}/key-1", False),
        ("phi", "phi-key-2", True),
        ("phi", "phi-key-1", False),
        ("phi-index", INDEX_KEY_FILE, True),
    ]
    ring = Keyring(key_dir, ORIGIN)
    assert [row["key_id"] for row in listed[:2]] == [key.key_id.hex() for key in ring.signing_keys()]

    assert keys_command("list", "--key-dir", str(key_dir)) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1].split() == ["KIND", "NAME", "KEY", "ID", "ALGORITHM", "CREATED", "ACTIVE"]
    assert f"{ORIGIN}/key-2" in table and "ML-DSA-65" in table and "X25519+ML-KEM-768" in table
    # Never private material: neither the signing keys' nor the PHI keys' nor the index key's.
    secrets = [base64.b64encode(key.private_key).decode()[:40] for key in ring.signing_keys()]
    secrets += [path.read_bytes().hex()[:40] for path in key_dir.glob("*.bin")]
    for secret in secrets:
        assert secret not in table and secret not in json.dumps(listed)


def test_the_commands_refuse_a_directory_without_keys_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert keys_command("list", "--key-dir", str(missing)) == 1
    assert "no audit key directory at" in capsys.readouterr().err
    assert keys_command("rotate", "--key-dir", str(missing)) == 1
    assert not missing.exists()  # a mistyped --key-dir never starts a new keyring

    empty = tmp_path / "empty"
    empty.mkdir()
    assert keys_command("rotate", "--key-dir", str(empty)) == 1
    assert "no signing key in" in capsys.readouterr().err
    assert keys_command("rotate", "--phi", "--key-dir", str(empty)) == 1
    assert "no PHI key in" in capsys.readouterr().err
    assert list(empty.iterdir()) == []
    with pytest.raises(SystemExit) as usage:
        keys_command("rotate", "--everything")
    assert usage.value.code == 2


def test_the_default_key_directory_is_the_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LUCERNA_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LUCERNA_AUDIT_KEY_DIR", raising=False)
    Keyring(tmp_path / "audit-keys", ORIGIN)
    assert keys_command("list") == 0
    assert f"{ORIGIN}/key-1" in capsys.readouterr().out

    monkeypatch.setenv("LUCERNA_AUDIT_KEY_DIR", str(tmp_path / "elsewhere"))
    assert keys_command("list") == 1
    assert str(tmp_path / "elsewhere") in capsys.readouterr().err


def test_a_keyring_notices_a_rotation_elsewhere_only_when_it_looks(tmp_path: Path) -> None:
    running = Keyring(tmp_path, ORIGIN)
    Keyring(tmp_path, ORIGIN).rotate()  # the operator's command, another process
    assert not running.refresh()  # listed at most every REFRESH_SECONDS: not yet
    assert running.active.name == f"{ORIGIN}/key-1"
    assert running.refresh(force=True)
    assert running.active.name == f"{ORIGIN}/key-2"
    assert not running.refresh(force=True)  # nothing new


# --- the running service ------------------------------------------------------------------------


class Audit:
    def __init__(self, resources: Resources, service: AuditService, client: httpx.AsyncClient) -> None:
        self.resources = resources
        self.service = service
        self.client = client

    async def publish(self, record: events_pb2.AuditRecord, message_id: str) -> None:
        envelope = codec.encode(AUDIT_RECORD, record, correlation_id="test", message_id=message_id)
        await self.resources.bus.publish(envelope)

    async def stored(self, n: int) -> None:
        record = events_pb2.AuditRecord(
            action=events_pb2.AuditRecord.INSTANCE_STORED, service="ingestion", sop_instance_uid=f"1.2.{n}"
        )
        await self.publish(record, f"stored-{n}")

    async def checkpoint(self, size: int) -> SignedCheckpoint:
        for _ in range(500):
            response = await self.client.get("/api/audit/checkpoints/latest")
            if response.status_code == 200 and response.text.split("\n")[1] == str(size):
                return SignedCheckpoint.parse(response.text)
            await asyncio.sleep(0.01)
        raise AssertionError(f"no checkpoint of size {size}")

    async def entry(self, key: str) -> None:
        for _ in range(500):
            if (await self.client.get("/api/audit/entries", params={"key": key})).status_code == 200:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no entry {key}")


@pytest.fixture
async def audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Audit]:
    # A rotation is taken up at the next look; a test should not wait the production interval.
    monkeypatch.setattr(keys_module, "REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(phi_module, "REFRESH_SECONDS", 0.0)
    resources = embedded_resources(tmp_path)
    service = AuditService(
        AuditSettings(checkpoint_every=3, checkpoint_interval_ms=50, key_dir=tmp_path / "keys", origin=ORIGIN)
    )
    app = create_app(resources, [service])
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as client,
    ):
        yield Audit(resources, service, client)


async def test_the_running_service_signs_with_the_rotated_key_and_publishes_it(
    audit: Audit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(3):
        await audit.stored(n)
    before = await audit.checkpoint(3)
    assert [s.name for s in before.signatures] == [f"{ORIGIN}/key-1"]

    assert keys_command("rotate", "--key-dir", str(tmp_path / "keys")) == 0
    capsys.readouterr()
    for n in range(3, 6):
        await audit.stored(n)
    after = await audit.checkpoint(6)

    assert [s.name for s in after.signatures] == [f"{ORIGIN}/key-2"]
    published = (await audit.client.get("/.well-known/lucerna-audit-keys")).json()
    assert [(key["name"], key["active"]) for key in published["keys"]] == [
        (f"{ORIGIN}/key-2", True),
        (f"{ORIGIN}/key-1", False),
    ]
    trusted = parse_public_keys(published["keys"])
    assert verify(before.note(), trusted).size == 3  # the old key keeps verifying
    assert verify(after.note(), trusted).size == 6


async def test_phi_sealed_before_and_after_a_rotation_opens_and_is_found_by_patient(
    audit: Audit, tmp_path: Path
) -> None:
    await audit.publish(access(1), "read-1")
    await audit.entry("read-1")
    new_key = phi_module.rotate(tmp_path / "keys")
    await audit.publish(access(2), "read-2")
    await audit.entry("read-2")

    accesses = audit.service._accesses
    assert accesses is not None
    first, second = await accesses.phi.get("read-1"), await accesses.phi.get("read-2")
    assert first is not None and second is not None
    assert first[4:12] != new_key.key_id and second[4:12] == new_key.key_id  # framed by its key
    found = (await audit.client.get("/fhir/AuditEvent", params={"patient": PATIENT})).json()
    assert found["total"] == 2
    # Both opened to render them: the patient and the query as received.
    events = [entry["resource"] for entry in found["entry"]]
    assert [event["entity"][0]["what"]["reference"] for event in events] == [PATIENT, PATIENT]
    queries = sorted(
        base64.b64decode(entity["query"]).decode()
        for event in events
        for entity in event["entity"]
        if "query" in entity
    )
    assert queries == [access(1).query, access(2).query]


# --- the anchorer --------------------------------------------------------------------------------


async def test_the_anchorer_registers_a_rotated_key_before_anchoring_what_it_signed(tmp_path: Path) -> None:
    audit_log = SqliteAuditLog(tmp_path / "audit.sqlite")
    store = SqliteAnchorStore(tmp_path / "anchors.sqlite")
    await audit_log.start()
    await store.start()
    try:
        ledger = FakeLedger()
        keyring = Keyring(tmp_path / "keys", ORIGIN)
        anchorer = Anchorer(audit_log, store, ledger, keyring, ORIGIN, retry_delays=(0.01,))
        await anchorer.prepare()

        async def grow(n: int, signer: Keyring) -> None:
            await audit_log.append([LogEntry(f"k{n}-{i}", f"entry {n} {i}".encode()) for i in range(n)])
            size = await audit_log.size()
            await audit_log.add_checkpoint(
                sign(Checkpoint(ORIGIN, size, await audit_log.root(size)), signer.active)
            )

        await grow(3, keyring)
        assert (await anchorer.anchor_newest()) is not None
        # Rotated by another process (the operator's command, another worker): this keyring has not
        # looked yet, and the ledger refuses a checkpoint by a key it does not know.
        elsewhere = Keyring(tmp_path / "keys", ORIGIN)
        rotated = elsewhere.rotate()
        await grow(2, elsewhere)

        anchored = await anchorer.anchor_newest()

        assert anchored is not None and anchored.size == 5
        assert ledger.keys[rotated.name] == rotated.public_key
        assert sorted(ledger.keys) == [f"{ORIGIN}/key-1", f"{ORIGIN}/key-2"]
        assert keyring.active.name == rotated.name
    finally:
        await store.close()
        await audit_log.close()


# --- the PHI key ring ---------------------------------------------------------------------------


def test_blobs_open_with_the_key_they_name_and_the_index_never_changes(tmp_path: Path) -> None:
    keys = PhiKeys.load_or_create(tmp_path)
    _, phi = split_phi(access(1))
    assert phi is not None
    old = keys.seal("read-1", phi)
    index = keys.patient_index(PATIENT)

    phi_module.rotate(tmp_path)
    assert keys.refresh(force=True)
    new = keys.seal("read-2", phi)

    assert keys.active.name == "phi-key-2"
    assert keys.open("read-1", old).patient == PATIENT
    assert keys.open("read-2", new).patient == PATIENT
    assert keys.patient_index(PATIENT) == index == PhiKeys.load_or_create(tmp_path).patient_index(PATIENT)
    with pytest.raises(ChannelError):
        keys.open("read-1", new)  # moved to another entry
    assert new[4:12] == keys.active.key_id != old[4:12]
    with pytest.raises(ChannelError):  # a frame altered to name key 1: it does not open
        keys.open("read-2", new[:4] + old[4:12] + new[12:])
    with pytest.raises(ChannelError, match="not in"):
        keys.open("read-2", new[:4] + bytes(8) + new[12:])
    # A process started before the rotation opens a blob sealed to the new key: it looks again.
    fresh = tmp_path / "copy"
    fresh.mkdir(mode=0o700)
    for path in tmp_path.glob("*.bin"):
        create_secret_file(fresh / path.name, path.read_bytes())
    (fresh / "phi-key-2.bin").unlink()
    started_before = PhiKeys.load_or_create(fresh)
    create_secret_file(fresh / "phi-key-2.bin", (tmp_path / "phi-key-2.bin").read_bytes())
    assert started_before.open("read-2", new).patient == PATIENT


def test_a_data_dir_from_before_rotation_keeps_its_blobs_and_its_index(tmp_path: Path) -> None:
    # As the audit service left it before keys had ids: phi-key.bin alone, blobs unframed, and index
    # rows under a key derived from it.
    private = RecipientPrivateKeys.generate()
    tmp_path.chmod(0o700)
    create_secret_file(tmp_path / KEY_FILE, private.to_bytes())
    _, phi = split_phi(access(1))
    assert phi is not None
    legacy_blob = seal(private.public, phi.SerializeToString(), b"lucerna/audit/phi/v1\nread-1")
    derived = HKDF(hashes.SHA256(), 32, None, b"lucerna/audit/patient-index/v1").derive(private.to_bytes())
    legacy_index = hmac.new(derived, PATIENT.encode(), hashlib.sha256).hexdigest()

    keys = PhiKeys.load_or_create(tmp_path)
    phi_module.rotate(tmp_path)
    keys.refresh(force=True)

    assert keys.open("read-1", legacy_blob).query == access(1).query
    assert keys.patient_index(PATIENT) == legacy_index
    assert (tmp_path / INDEX_KEY_FILE).stat().st_mode & 0o777 == 0o600
    # A new data dir's index key is random, not derived from its first at-rest key.
    fresh = PhiKeys.load_or_create(tmp_path / "fresh")
    first = RecipientPrivateKeys.from_bytes((tmp_path / "fresh" / KEY_FILE).read_bytes())
    from_first = HKDF(hashes.SHA256(), 32, None, b"lucerna/audit/patient-index/v1").derive(first.to_bytes())
    assert fresh.patient_index(PATIENT) != hmac.new(from_first, PATIENT.encode(), hashlib.sha256).hexdigest()
