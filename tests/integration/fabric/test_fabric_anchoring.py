"""Anchoring the audit log's signed checkpoints on a real Fabric network, through both orgs' peers:
a first checkpoint, a grown one with the log's own consistency proof, reads by latest and by size,
and the chaincode refusing a forged signature, a wrong proof and a rewritten history."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import servers  # infra/local/servers.py, on the path tests/conftest.py sets up

from lucerna.audit.checkpoints import SignedCheckpoint
from lucerna.audit.keys import Keyring
from lucerna.audit.log import SqliteAuditLog
from tests.integration.fabric.log_kit import grow, signed_checkpoint

pytestmark = pytest.mark.integration


def _proof_json(proof: list[bytes]) -> str:
    return json.dumps([base64.b64encode(node).decode() for node in proof])


def _record(text: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(text)
    return record


async def test_anchors_real_checkpoints_and_refuses_forged_or_inconsistent_ones(
    fabric: servers.FabricNetwork, audit_log: SqliteAuditLog, origin: str, tmp_path: Path
) -> None:
    keyring = Keyring(tmp_path / "keys", origin)
    key = keyring.active
    # Org1's admin MSP (ANCHORS_ADMIN_MSP) registers the log's key; Org1's User1 is of that MSP.
    fabric.invoke("RegisterLogKey", origin, key.name, base64.b64encode(key.public_key).decode())
    (registered,) = json.loads(fabric.query("LogKeys", origin))
    assert (registered["keyName"], registered["keyId"]) == (key.name, key.key_id.hex())

    await grow(audit_log, 5)
    first = await signed_checkpoint(audit_log, keyring, origin)
    fabric.invoke("Anchor", origin, first.note(), "")
    latest = _record(fabric.query("Latest", origin))
    assert (latest["treeSize"], latest["rootHash"]) == (5, base64.b64encode(first.checkpoint.root).decode())
    assert latest["signedBy"] == [key.name]
    assert latest["checkpoint"] == first.note()

    await grow(audit_log, 8)
    grown = await signed_checkpoint(audit_log, keyring, origin)
    proof = await audit_log.consistency_proof(5, 13)
    fabric.invoke("Anchor", origin, grown.note(), _proof_json(proof))
    assert _record(fabric.query("Latest", origin))["treeSize"] == 13
    # Both orgs' peers hold the same state: read the first anchor back from Org2's peer.
    by_size = _record(fabric.query("BySize", origin, "5", org="org2"))
    assert by_size["rootHash"] == latest["rootHash"]
    assert by_size["txId"] == latest["txId"]

    # A flipped byte in the signature: the endorsing peers' chaincode refuses the note.
    await grow(audit_log, 3)
    honest = await signed_checkpoint(audit_log, keyring, origin)
    signature = honest.signatures[0]
    flipped = bytes([signature.signature[0] ^ 0x01]) + signature.signature[1:]
    forged = SignedCheckpoint(honest.checkpoint, (replace(signature, signature=flipped),))
    proof = await audit_log.consistency_proof(13, 16)
    with pytest.raises(servers.FabricError, match="signature refused"):
        fabric.invoke("Anchor", origin, forged.note(), _proof_json(proof))

    # A wrong consistency proof (one node altered) for an honestly signed checkpoint.
    wrong = [bytes([proof[0][0] ^ 0x01]) + proof[0][1:], *proof[1:]]
    with pytest.raises(servers.FabricError, match="inconsistent with the anchored history"):
        fabric.invoke("Anchor", origin, honest.note(), _proof_json(wrong))

    # A rewritten history: another log of 16 entries whose first 13 differ, signed by the same
    # key, with its own (internally valid) consistency proof from 13.
    rewritten_log = SqliteAuditLog(tmp_path / "rewritten.sqlite")
    await rewritten_log.start()
    try:
        await grow(rewritten_log, 16, prefix="rewritten")
        rewritten = await signed_checkpoint(rewritten_log, keyring, origin)
        own_proof = await rewritten_log.consistency_proof(13, 16)
    finally:
        await rewritten_log.close()
    with pytest.raises(servers.FabricError, match="inconsistent with the anchored history"):
        fabric.invoke("Anchor", origin, rewritten.note(), _proof_json(own_proof))

    # None of the refused notes changed the ledger; the honest one is then accepted.
    assert _record(fabric.query("Latest", origin))["treeSize"] == 13
    fabric.invoke("Anchor", origin, honest.note(), _proof_json(proof))
    assert _record(fabric.query("Latest", origin))["treeSize"] == 16
