"""The audit service deployed as ``lucerna serve audit`` runs it (uvicorn, its lifespan, the log on
FerretDB) with the gRPC append API and channel keys from files: a service appends over the post-quantum
channel and an auditor reads the entry over HTTP and checks its inclusion proof against a signed
checkpoint; a client the service does not trust appends nothing."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn

from lucerna.audit import merkle
from lucerna.audit.checkpoints import verify
from lucerna.audit.keys import parse_public_keys
from lucerna.audit.service import AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.core.audit_channel import AuditChannelClient, AuditChannelError
from lucerna.core.bootstrap import build_resources
from lucerna.core.http import create_app
from lucerna.core.pqchannel import Identity
from lucerna.core.pqchannel_keys import save_identity, write_trust_store
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2

pytestmark = pytest.mark.integration

AUDIT = Identity.generate("hospital.example/audit")
FHIR = Identity.generate("hospital.example/fhir")


@dataclass
class Deployed:
    http: httpx.AsyncClient
    grpc_target: str

    def client(self, identity: Identity = FHIR) -> AuditChannelClient:
        return AuditChannelClient(
            self.grpc_target, identity, {AUDIT.name: AUDIT.public_key}, AUDIT.name, attempts=1
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def deployed(tmp_path: Path, mongodb_url: str, mongodb_database: str) -> AsyncIterator[Deployed]:
    save_identity(tmp_path / "channel" / "audit.json", AUDIT)
    write_trust_store(tmp_path / "channel" / "clients.json", {FHIR.name: FHIR.public_key})
    resources = build_resources(
        CoreSettings(
            data_dir=tmp_path,
            metadata_backend="mongodb",
            mongodb_url=mongodb_url,
            mongodb_database=mongodb_database,
            auth_required=False,
        )
    )
    grpc_port, http_port = _free_port(), _free_port()
    service = AuditService(
        AuditSettings(
            key_dir=tmp_path / "keys",
            checkpoint_every=2,
            checkpoint_interval_ms=100,
            grpc_listen=f"127.0.0.1:{grpc_port}",
            grpc_identity_file=tmp_path / "channel" / "audit.json",
            grpc_trust_file=tmp_path / "channel" / "clients.json",
        )
    )
    config = uvicorn.Config(
        create_app(resources, [service]), host="127.0.0.1", port=http_port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
        yield Deployed(http, f"127.0.0.1:{grpc_port}")
    server.should_exit = True
    await serving


def _published(n: int) -> events_pb2.AuditRecord:
    return events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.RESULT_PUBLISHED,
        service="fhir",
        at=datetime(2026, 11, 21, 12, 0, n, tzinfo=UTC),
        study_instance_uid="1.2.840.99.1",
        sha256=f"{n:064x}",
        details={"diagnostic_report": f"DiagnosticReport/r{n}"},
    )


async def test_an_append_over_the_channel_is_read_back_with_its_proof(deployed: Deployed) -> None:
    client = deployed.client()
    responses = await asyncio.gather(
        *(client.append(f"result-published:r{n}", _published(n)) for n in range(4))
    )
    await client.close()
    assert sorted(r.sequence for r in responses) == [0, 1, 2, 3]
    seq = responses[2].sequence

    entry = (await deployed.http.get(f"/api/audit/entries/{seq}")).json()
    assert entry["key"] == "result-published:r2"
    assert entry["record"]["details"] == {"diagnostic_report": "DiagnosticReport/r2"}
    for _ in range(200):
        latest = await deployed.http.get("/api/audit/checkpoints/latest")
        if latest.status_code == 200 and latest.text.split("\n")[1] == "4":
            break
        await asyncio.sleep(0.05)
    keys = (await deployed.http.get("/.well-known/lucerna-audit-keys")).json()
    checkpoint = verify(latest.text, parse_public_keys(keys["keys"]), origin=keys["origin"])
    assert checkpoint.size == 4
    proof = (await deployed.http.get(f"/api/audit/proofs/inclusion/{seq}", params={"size": "4"})).json()
    merkle.verify_inclusion(
        merkle.leaf_hash(base64.b64decode(entry["data"])),
        seq,
        4,
        [base64.b64decode(node) for node in proof["proof"]],
        checkpoint.root,
    )


async def test_a_client_it_does_not_trust_appends_nothing(deployed: Deployed) -> None:
    client = deployed.client(Identity.generate("hospital.example/intruder"))
    with pytest.raises(AuditChannelError, match=r"UNAUTHENTICATED.*unknown peer 'hospital.example/intruder'"):
        await client.append("result-published:x", _published(9))
    await client.close()
    assert (await deployed.http.get("/api/audit/entries/0")).status_code == 404
