"""The audit service on the embedded adapters: records in, an auditor verifies entries against a
signed checkpoint with nothing but the published public keys; redeliveries are appended once."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jwt
import pytest
from pydantic import SecretStr

from lucerna.audit import merkle
from lucerna.audit.checkpoints import CheckpointError, verify
from lucerna.audit.keys import parse_public_keys
from lucerna.audit.service import AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.core.events import codec
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.events.v1 import events_pb2
from tests.unit.orchestrator.kit import embedded_resources

pytestmark = pytest.mark.unit

SECRET = "audit-test-secret-0123456789abcdef0123"
AUDITOR = {
    "authorization": "Bearer "
    + jwt.encode(
        {
            "sub": "auditor@hospital.example",
            "scope": "system/AuditEvent.read",
            "exp": int(time.time()) + 3600,
        },
        SECRET,
        algorithm="HS256",
    )
}


class Audit:
    def __init__(self, resources: Resources, client: httpx.AsyncClient) -> None:
        self.resources = resources
        self.client = client

    async def record(self, n: int) -> None:
        message = events_pb2.AuditRecord(
            action=events_pb2.AuditRecord.INSTANCE_STORED,
            service="ingestion",
            at=datetime(2026, 11, 21, 10, 0, n, tzinfo=UTC),
            sop_instance_uid=f"1.2.3.{n}",
            sha256=f"{n:064x}",
        )
        envelope = codec.encode(
            AUDIT_RECORD, message, correlation_id="1.2.3", message_id=f"instance-stored:{n}"
        )
        await self.resources.bus.publish(envelope)

    async def get(self, path: str, **params: str) -> httpx.Response:
        return await self.client.get(path, params=params, headers=AUDITOR)

    async def until_checkpoint(self, size: int) -> str:
        for _ in range(500):
            response = await self.get("/api/audit/checkpoints/latest")
            if response.status_code == 200 and response.text.split("\n")[1] == str(size):
                return response.text
            await asyncio.sleep(0.01)
        raise AssertionError(f"no checkpoint of size {size}")


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[Audit]:
    resources = embedded_resources(tmp_path, auth_required=True, jwt_secret=SecretStr(SECRET))
    settings = AuditSettings(checkpoint_every=5, checkpoint_interval_ms=50, key_dir=tmp_path / "keys")
    app = create_app(resources, [AuditService(settings)])
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://audit"
    ) as client:
        yield Audit(resources, client)


async def test_an_auditor_verifies_an_entry_with_only_the_public_keys(audit: Audit) -> None:
    for n in range(12):
        await audit.record(n)
    note = await audit.until_checkpoint(12)

    keys = (await audit.client.get("/.well-known/lucerna-audit-keys")).json()  # public: no token
    trusted = parse_public_keys(keys["keys"])
    checkpoint = verify(note, trusted, origin=keys["origin"])
    assert checkpoint.size == 12

    entry = (await audit.get("/api/audit/entries/7")).json()
    assert entry["key"] == "instance-stored:7"
    assert entry["record"]["sop_instance_uid"] == "1.2.3.7"
    proof = (await audit.get("/api/audit/proofs/inclusion/7")).json()
    assert proof["tree_size"] == 12
    leaf = merkle.leaf_hash(base64.b64decode(entry["data"]))
    nodes = [base64.b64decode(node) for node in proof["proof"]]
    merkle.verify_inclusion(leaf, 7, 12, nodes, checkpoint.root)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(merkle.leaf_hash(b"forged"), 7, 12, nodes, checkpoint.root)
    with pytest.raises(CheckpointError):
        verify(note.replace("\n12\n", "\n13\n"), trusted)

    history = (await audit.get("/api/audit/checkpoints")).json()["checkpoints"]
    assert history[0]["size"] == 12
    older = history[-1]
    consistency = (
        await audit.get("/api/audit/proofs/consistency", **{"from": str(older["size"]), "to": "12"})
    ).json()
    merkle.verify_consistency(
        older["size"],
        12,
        base64.b64decode(older["root_hash"]),
        checkpoint.root,
        [base64.b64decode(node) for node in consistency["proof"]],
    )


async def test_a_redelivered_record_is_appended_once(audit: Audit) -> None:
    for n in (1, 2, 2, 3, 1):
        await audit.record(n)
    note = await audit.until_checkpoint(3)
    assert note.startswith("lucerna.local/audit-log\n3\n")
    assert (await audit.get("/api/audit/entries/3")).status_code == 404


async def test_the_api_wants_the_audit_scope_and_says_what_is_wrong(audit: Audit) -> None:
    assert (await audit.client.get("/api/audit/checkpoints/latest")).status_code == 401
    assert (await audit.get("/api/audit/entries/x")).status_code == 400
    assert (await audit.get("/api/audit/entries/99")).status_code == 404
    assert (await audit.get("/api/audit/checkpoints", limit="0")).status_code == 400
