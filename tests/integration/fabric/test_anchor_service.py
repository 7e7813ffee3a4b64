"""The anchor service (services/anchor) on a real Fabric network, through its gRPC API as the audit
service calls it: real checkpoints of a real audit log anchored through the Fabric Gateway (both
orgs endorse), read back from the ledger with their transaction and block, refusals mapped to gRPC
codes with the chaincode's message, the bearer token, and Fabric out of reach."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import servers  # infra/local/servers.py, on the path tests/conftest.py sets up

from lucerna.anchoring.v1 import anchoring_pb2 as pb
from lucerna.anchoring.v1.anchoring_pb2_grpc import AnchorsStub
from lucerna.audit.checkpoints import SignedCheckpoint
from lucerna.audit.keys import Keyring
from lucerna.audit.log import SqliteAuditLog
from tests.integration.fabric.log_kit import grow, signed_checkpoint

pytestmark = pytest.mark.integration

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
async def anchors(anchor_service: servers.AnchorService) -> AsyncIterator[AnchorsStub]:
    async with grpc.aio.insecure_channel(anchor_service.address) as channel:
        yield AnchorsStub(channel)


@pytest.fixture
def auth(anchor_service: servers.AnchorService) -> Metadata:
    return (("authorization", f"Bearer {anchor_service.token}"),)


def _where(anchored: pb.Anchored) -> tuple[object, ...]:
    """What the ledger says about an anchor: the stored note and root, and where it landed."""
    return (
        anchored.tree_size,
        anchored.root_hash,
        anchored.checkpoint,
        anchored.transaction_id,
        anchored.block_number,
        anchored.committed_at.ToNanoseconds(),
    )


async def test_anchors_checkpoints_and_reads_them_back_from_the_ledger(
    anchors: AnchorsStub,
    auth: Metadata,
    fabric: servers.FabricNetwork,
    audit_log: SqliteAuditLog,
    origin: str,
    tmp_path: Path,
) -> None:
    keyring = Keyring(tmp_path / "keys", origin)
    key = keyring.active
    request = pb.RegisterLogKeyRequest(origin=origin, key_name=key.name, public_key=key.public_key)
    registered = await anchors.RegisterLogKey(request, metadata=auth)
    assert (registered.origin, registered.key_name, registered.key_id) == (origin, key.name, key.key_id.hex())
    assert registered.transaction_id
    # Registering the same key again changes nothing: the answer names the registering transaction.
    assert (await anchors.RegisterLogKey(request, metadata=auth)).transaction_id == registered.transaction_id

    await grow(audit_log, 5)
    first = await signed_checkpoint(audit_log, keyring, origin)
    anchored_first = await anchors.Anchor(
        pb.AnchorRequest(origin=origin, checkpoint=first.note()), metadata=auth
    )
    assert anchored_first.origin == origin
    assert (anchored_first.tree_size, anchored_first.root_hash) == (5, first.checkpoint.root)
    assert anchored_first.checkpoint == first.note()
    assert list(anchored_first.signed_by) == [key.name]
    assert (anchored_first.channel, anchored_first.chaincode) == (fabric.channel, fabric.chaincode)
    assert len(anchored_first.transaction_id) == 64
    assert anchored_first.block_number > 0
    assert abs(anchored_first.committed_at.ToDatetime().timestamp() - time.time()) < 300

    await grow(audit_log, 8)
    grown = await signed_checkpoint(audit_log, keyring, origin)
    proof = await audit_log.consistency_proof(5, 13)
    anchored_grown = await anchors.Anchor(
        pb.AnchorRequest(origin=origin, checkpoint=grown.note(), consistency_proof=proof), metadata=auth
    )
    assert anchored_grown.tree_size == 13
    assert anchored_grown.block_number > anchored_first.block_number
    assert anchored_grown.transaction_id != anchored_first.transaction_id

    # Read back: the record from the chaincode, the block from the ledger (qscc), not from a cache.
    latest = await anchors.Latest(pb.LatestRequest(origin=origin), metadata=auth)
    assert _where(latest) == _where(anchored_grown)
    by_size = await anchors.BySize(pb.BySizeRequest(origin=origin, tree_size=5), metadata=auth)
    assert _where(by_size) == _where(anchored_first)
    # The peer CLI, on Org2's peer, agrees on the transaction: both orgs hold the same ledger.
    assert f'"txId":"{anchored_first.transaction_id}"' in fabric.query("BySize", origin, "5", org="org2")

    # Anchoring the same checkpoint again is answered with the anchor already on the ledger.
    again = await anchors.Anchor(pb.AnchorRequest(origin=origin, checkpoint=first.note()), metadata=auth)
    assert _where(again) == _where(anchored_first)

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await anchors.BySize(pb.BySizeRequest(origin=origin, tree_size=7), metadata=auth)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == f'not found: no checkpoint of size 7 anchored for origin "{origin}"'

    # A flipped byte in the signature of an honest checkpoint: the chaincode refuses the note.
    await grow(audit_log, 3)
    honest = await signed_checkpoint(audit_log, keyring, origin)
    honest_proof = await audit_log.consistency_proof(13, 16)
    signature = honest.signatures[0]
    flipped = bytes([signature.signature[0] ^ 0x01]) + signature.signature[1:]
    forged = SignedCheckpoint(honest.checkpoint, (replace(signature, signature=flipped),))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anchors.Anchor(
            pb.AnchorRequest(origin=origin, checkpoint=forged.note(), consistency_proof=honest_proof),
            metadata=auth,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("signature refused: the ML-DSA-65 signature of registered key")

    # A rewritten history: another log of 16 entries whose first 13 differ, signed by the same key,
    # with its own (internally valid) consistency proof from 13.
    rewritten_log = SqliteAuditLog(tmp_path / "rewritten.sqlite")
    await rewritten_log.start()
    try:
        await grow(rewritten_log, 16, prefix="rewritten")
        rewritten = await signed_checkpoint(rewritten_log, keyring, origin)
        own_proof = await rewritten_log.consistency_proof(13, 16)
    finally:
        await rewritten_log.close()
    with pytest.raises(grpc.aio.AioRpcError) as inconsistent:
        await anchors.Anchor(
            pb.AnchorRequest(origin=origin, checkpoint=rewritten.note(), consistency_proof=own_proof),
            metadata=auth,
        )
    assert inconsistent.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "inconsistent with the anchored history" in inconsistent.value.details()

    # Another public key under a registered key name: keys are never replaced.
    other = Keyring(tmp_path / "other-keys", origin).active
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await anchors.RegisterLogKey(
            pb.RegisterLogKeyRequest(origin=origin, key_name=key.name, public_key=other.public_key),
            metadata=auth,
        )
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert conflict.value.details().startswith("conflict: ")

    # None of the refusals changed the ledger; the honest checkpoint is then accepted.
    assert _where(await anchors.Latest(pb.LatestRequest(origin=origin), metadata=auth)) == _where(
        anchored_grown
    )
    accepted = await anchors.Anchor(
        pb.AnchorRequest(origin=origin, checkpoint=honest.note(), consistency_proof=honest_proof),
        metadata=auth,
    )
    assert accepted.tree_size == 16
    assert _where(await anchors.Latest(pb.LatestRequest(origin=origin), metadata=auth)) == _where(accepted)


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no token"),
        pytest.param((("authorization", "Bearer not-the-token-at-all"),), id="wrong token"),
        pytest.param((("authorization", "Basic dXNlcjpwYXNz"),), id="another scheme"),
    ],
)
async def test_calls_without_the_token_are_unauthenticated(
    anchors: AnchorsStub, anchor_service: servers.AnchorService, metadata: Metadata, origin: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anchors.Latest(pb.LatestRequest(origin=origin), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert anchor_service.token not in (refused.value.details() or "")


async def test_fabric_out_of_reach_is_unavailable_and_the_service_recovers(
    anchors: AnchorsStub, auth: Metadata, anchor_service: servers.AnchorService, fabric: servers.FabricNetwork
) -> None:
    peer = fabric.peers["org1"]  # the peer whose Fabric Gateway the service uses
    await asyncio.to_thread(peer.stop)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await anchors.Latest(
                pb.LatestRequest(origin="lucerna.test/unreachable"), metadata=auth, timeout=30
            )
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert unavailable.value.details().startswith("Fabric is unreachable")
        # The failed call turned the service's health to NOT_SERVING at once.
        assert not await asyncio.to_thread(anchor_service.can_anchor)
    finally:
        await asyncio.to_thread(peer.start)
    # The same service process recovers: both orgs endorse again (its health), and reads answer.
    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(anchor_service.can_anchor):
        assert time.monotonic() < deadline, f"the anchor service did not recover\n{anchor_service.log_tail()}"
        await asyncio.sleep(0.5)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await anchors.Latest(pb.LatestRequest(origin="lucerna.test/unreachable"), metadata=auth)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
