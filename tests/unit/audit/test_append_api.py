"""The append API over the post-quantum channel, on an in-process gRPC server (loopback, port 0) and a
SQLite log: appends land once, concurrently, a burst of them in a few batches; wrong keys, impostors,
replays and flipped bits are refused with nothing appended."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from pydantic import SecretStr

from lucerna.audit.appender import GroupAppender
from lucerna.audit.grpc_api import AppendApi, AppendSessions
from lucerna.audit.log import Appended, LogEntry, SqliteAuditLog
from lucerna.audit.service import AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.auditlog.v1 import auditlog_pb2, auditlog_pb2_grpc
from lucerna.core.audit_channel import (
    LOCAL_AUDIT_NAME,
    AuditChannelClient,
    AuditChannelError,
    local_channel_keys,
)
from lucerna.core.audit_trail import AuditTrailSettings, BusAuditTrail, ChannelAuditTrail, build_audit_trail
from lucerna.core.events import codec
from lucerna.core.events.ports import PublishError
from lucerna.core.events.topology import AUDIT_RECORD
from lucerna.core.http import create_app
from lucerna.core.pqchannel import Channel, Identity, Initiator, TrustStore
from lucerna.core.pqchannel_keys import ChannelKeyError
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2
from tests.unit.orchestrator.kit import embedded_resources

pytestmark = pytest.mark.unit

SERVER = Identity.generate("lucerna.test/audit")
CLIENT = Identity.generate("lucerna.test/ingestion")
SERVER_TRUSTS: TrustStore = {CLIENT.name: CLIENT.public_key}
CLIENT_TRUSTS: TrustStore = {SERVER.name: SERVER.public_key}


def record(n: int) -> events_pb2.AuditRecord:
    return events_pb2.AuditRecord(
        action=events_pb2.AuditRecord.INSTANCE_STORED,
        service="ingestion",
        at=datetime(2026, 11, 21, 10, 0, n % 60, tzinfo=UTC),
        sop_instance_uid=f"1.2.3.{n}",
        sha256=f"{n:064x}",
    )


@dataclass
class Server:
    log: SqliteAuditLog
    api: AppendApi

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.api.port}"

    def client(
        self, identity: Identity = CLIENT, trusted: TrustStore = CLIENT_TRUSTS, **options: Any
    ) -> AuditChannelClient:
        return AuditChannelClient(self.target, identity, trusted, SERVER.name, **options)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with _serving(tmp_path) as running:
        yield running


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path, **session_options: Any) -> AsyncIterator[Server]:
    audit_log = SqliteAuditLog(tmp_path / "audit.sqlite")
    await audit_log.start()
    appender: GroupAppender[LogEntry, Appended] = GroupAppender(audit_log.append)

    async def submit(key: str, message: events_pb2.AuditRecord) -> Appended:
        return await appender.append(LogEntry(key, message.SerializeToString(deterministic=True)))

    sessions = AppendSessions(SERVER, SERVER_TRUSTS, submit, **session_options)
    api = AppendApi("127.0.0.1:0", sessions, max_message_bytes=64 * 1024)
    await api.start()
    try:
        yield Server(audit_log, api)
    finally:
        await api.stop()
        await audit_log.close()


class RawSession:
    """A session driven frame by frame, to replay and alter records."""

    def __init__(self, call: Any, channel: Channel) -> None:
        self.call = call
        self.channel = channel

    @classmethod
    async def open(cls, grpc_channel: grpc.aio.Channel) -> RawSession:
        call = auditlog_pb2_grpc.AuditLogStub(grpc_channel).Session()
        initiator = Initiator(CLIENT, CLIENT_TRUSTS, SERVER.name)
        await call.write(auditlog_pb2.Frame(data=initiator.start()))
        message3, channel = initiator.finish((await call.read()).data)
        await call.write(auditlog_pb2.Frame(data=message3))
        return cls(call, channel)

    def request(self, request_id: int, message_id: str) -> bytes:
        """A record carrying a batch of one request."""
        return self.batch(
            auditlog_pb2.AppendRequest(request_id=request_id, message_id=message_id, record=record(1))
        )

    def batch(self, *requests: auditlog_pb2.AppendRequest) -> bytes:
        return self.channel.encrypt(auditlog_pb2.AppendBatch(requests=requests).SerializeToString())

    async def send(self, data: bytes) -> None:
        await self.call.write(auditlog_pb2.Frame(data=data))

    async def results(self) -> list[auditlog_pb2.AppendResponse]:
        """The responses of the next record from the server."""
        results = auditlog_pb2.AppendResults()
        results.ParseFromString(self.channel.decrypt((await self.call.read()).data))
        return list(results.responses)

    async def response(self) -> auditlog_pb2.AppendResponse:
        (response,) = await self.results()
        return response

    async def refusal(self) -> tuple[grpc.StatusCode, str]:
        """The status the server ended the call with, after reading whatever it still sent."""
        try:
            while await self.call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return await self.call.code(), await self.call.details()


async def test_an_append_lands_once_and_a_resend_answers_its_first_place(server: Server) -> None:
    client = server.client()
    first = await client.append("instance-stored:1", record(1))
    second = await client.append("instance-stored:2", record(2))
    again = await client.append("instance-stored:1", record(1))
    await client.close()

    assert (first.sequence, first.duplicate) == (0, False)
    assert (second.sequence, second.duplicate) == (1, False)
    assert (again.sequence, again.duplicate) == (0, True)
    assert await server.log.size() == 2
    stored = await server.log.entry(0)
    assert stored is not None
    assert stored.key == "instance-stored:1"
    assert events_pb2.AuditRecord.FromString(stored.data).sop_instance_uid == "1.2.3.1"
    assert client.handshakes == 1


async def test_concurrent_appends_share_one_session_and_get_dense_sequences(server: Server) -> None:
    client = server.client()
    responses = await asyncio.gather(*(client.append(f"m{n}", record(n)) for n in range(300)))
    await client.close()

    assert sorted(r.sequence for r in responses) == list(range(300))
    assert not any(r.duplicate for r in responses)
    assert client.handshakes == 1
    assert await server.log.size() == 300
    for n in (0, 150, 299):
        stored = await server.log.entry(responses[n].sequence)
        assert stored is not None
        assert stored.key == f"m{n}"


async def test_a_burst_of_concurrent_appends_travels_in_fewer_frames_than_requests(server: Server) -> None:
    client = server.client(max_batch=100)
    await client.append("m-first", record(0))  # the handshake, and one frame for one lone append
    assert client.records_sent == 1
    responses = await asyncio.gather(*(client.append(f"m{n}", record(n)) for n in range(300)))
    burst_frames = client.records_sent - 1
    await client.close()

    assert 3 <= burst_frames < 300  # batched, and never more than max_batch requests in one
    assert sorted(r.sequence for r in responses) == list(range(1, 301))
    assert await server.log.size() == 301
    for n in (0, 150, 299):
        stored = await server.log.entry(responses[n].sequence)
        assert stored is not None
        assert stored.key == f"m{n}"
    assert client.handshakes == 1


async def test_a_record_too_large_for_a_message_is_refused_before_it_is_sent(server: Server) -> None:
    client = server.client(max_message_bytes=8 * 1024)
    large = record(1)
    large.details["note"] = "x" * 9000
    with pytest.raises(AuditChannelError, match=r"audit record m1 is \d+ bytes; the channel carries at most"):
        await client.append("m1", large)
    assert client.records_sent == 0
    assert (await client.append("m2", record(2))).sequence == 0  # nothing else was disturbed
    await client.close()
    assert await server.log.size() == 1


async def test_a_batch_is_answered_in_one_frame_and_its_invalid_requests_do_not_stop_the_rest(
    server: Server,
) -> None:
    async with grpc.aio.insecure_channel(server.target) as grpc_channel:
        session = await RawSession.open(grpc_channel)
        await session.send(
            session.batch(
                auditlog_pb2.AppendRequest(request_id=1, message_id="m1", record=record(1)),
                auditlog_pb2.AppendRequest(request_id=2, message_id="", record=record(2)),
                auditlog_pb2.AppendRequest(request_id=3, message_id="m3", record=record(3)),
            )
        )
        answered = {response.request_id: response for response in await session.results()}
        session.call.cancel()
    assert set(answered) == {1, 2, 3}
    assert "message_id must be" in answered[2].error
    assert sorted(answered[n].sequence for n in (1, 3)) == [0, 1]
    assert not answered[1].error and not answered[3].error
    assert await server.log.size() == 2


async def test_an_answer_too_large_for_one_message_comes_in_several(tmp_path: Path) -> None:
    # Every request refused: each response carries an error text, 40 of them more than 1 KiB.
    async with (
        _serving(tmp_path, max_message_bytes=1024) as running,
        grpc.aio.insecure_channel(running.target) as grpc_channel,
    ):
        session = await RawSession.open(grpc_channel)
        refused = [
            auditlog_pb2.AppendRequest(request_id=n, message_id="m", record=record(n)) for n in range(40)
        ]
        for request in refused:
            request.record.ClearField("service")
        await session.send(session.batch(*refused))
        answered: list[auditlog_pb2.AppendResponse] = []
        frames = 0
        while len(answered) < 40:
            answered += await session.results()
            frames += 1
        session.call.cancel()
        assert await running.log.size() == 0
    assert frames > 1
    assert sorted(r.request_id for r in answered) == list(range(40))
    assert all("does not name the service" in r.error for r in answered)


async def test_a_record_that_is_not_a_batch_ends_the_session_with_nothing_appended(server: Server) -> None:
    # A bare AppendRequest: what a client from before batching sent.
    async with grpc.aio.insecure_channel(server.target) as grpc_channel:
        session = await RawSession.open(grpc_channel)
        bare = auditlog_pb2.AppendRequest(request_id=1, message_id="m1", record=record(1))
        await session.send(session.channel.encrypt(bare.SerializeToString()))
        code, details = await session.refusal()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an AppendBatch of at least one request" in details
    assert await server.log.size() == 0


async def test_an_invalid_record_is_answered_with_an_error_and_nothing_appended(server: Server) -> None:
    client = server.client()
    with pytest.raises(AuditChannelError, match="record action 0 is not a known action"):
        await client.append("m1", events_pb2.AuditRecord(service="ingestion"))
    with pytest.raises(AuditChannelError, match="does not name the service"):
        await client.append("m2", events_pb2.AuditRecord(action=events_pb2.AuditRecord.STUDY_READY))
    with pytest.raises(AuditChannelError, match="message_id must be"):
        await client.append("", record(3))
    still = await client.append("m4", record(4))  # the session is still good
    await client.close()
    assert still.sequence == 0
    assert await server.log.size() == 1


async def test_an_untrusted_client_is_refused_before_anything_is_appended(server: Server) -> None:
    stranger = Identity.generate("lucerna.test/stranger")
    client = server.client(stranger, attempts=1)
    with pytest.raises(AuditChannelError, match=r"UNAUTHENTICATED.*unknown peer 'lucerna.test/stranger'"):
        await client.append("m1", record(1))
    await client.close()
    assert await server.log.size() == 0


async def test_a_client_signing_with_the_wrong_key_is_refused(server: Server) -> None:
    impostor = Identity(CLIENT.name, CLIENT.public_key, Identity.generate("x").secret_key)
    client = server.client(impostor, attempts=2)
    with pytest.raises(
        AuditChannelError, match=r"UNAUTHENTICATED.*bad signature from peer 'lucerna.test/ingestion'"
    ):
        await client.append("m1", record(1))
    await client.close()
    assert await server.log.size() == 0


async def test_a_server_impersonator_is_refused_by_the_client(server: Server) -> None:
    # The client pins another key for the audit service's name: the real server cannot prove it holds it.
    pinned_elsewhere = {SERVER.name: Identity.generate(SERVER.name).public_key}
    client = server.client(trusted=pinned_elsewhere, attempts=1)
    with pytest.raises(
        AuditChannelError, match=r"failed the handshake: bad signature from peer 'lucerna.test/audit'"
    ):
        await client.append("m1", record(1))
    await client.close()
    assert await server.log.size() == 0


async def test_a_replayed_record_ends_the_session_and_appends_nothing_more(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.target) as grpc_channel:
        session = await RawSession.open(grpc_channel)
        frame = session.request(7, "m1")
        await session.send(frame)
        assert (await session.response()).sequence == 0
        await session.send(frame)
        code, details = await session.refusal()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "record 0 is a replay" in details
    assert await server.log.size() == 1


async def test_a_flipped_bit_in_a_record_ends_the_session_and_appends_nothing(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.target) as grpc_channel:
        session = await RawSession.open(grpc_channel)
        frame = session.request(1, "m1")
        await session.send(frame[:20] + bytes((frame[20] ^ 1,)) + frame[21:])
        code, details = await session.refusal()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "record 0 failed authentication" in details
    assert await server.log.size() == 0


async def test_the_client_opens_a_new_session_when_the_stream_breaks(server: Server, tmp_path: Path) -> None:
    client = server.client()
    assert (await client.append("m1", record(1))).sequence == 0
    await server.api.stop()  # the server goes away, and comes back on the same port
    restarted = AppendApi(
        server.target,
        AppendSessions(SERVER, SERVER_TRUSTS, _submit_to(server.log)),
        max_message_bytes=64 * 1024,
    )
    await restarted.start()
    try:
        assert (await client.append("m2", record(2))).sequence == 1
    finally:
        await client.close()
        await restarted.stop()
    assert client.handshakes == 2


def _submit_to(audit_log: SqliteAuditLog) -> Any:
    async def submit(key: str, message: events_pb2.AuditRecord) -> Appended:
        (appended,) = await audit_log.append([LogEntry(key, message.SerializeToString(deterministic=True))])
        return appended

    return submit


async def test_the_audit_service_serves_the_api_with_local_keys_through_its_one_append_path(
    tmp_path: Path,
) -> None:
    resources = embedded_resources(tmp_path, auth_required=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = AuditService(AuditSettings(key_dir=tmp_path / "keys", grpc_listen=f"127.0.0.1:{port}"))
    app = create_app(resources, [service])
    keys = local_channel_keys(tmp_path)  # what a service of this host uses: created here, pinned there
    client = AuditChannelClient(
        f"127.0.0.1:{port}", keys.services, keys.trusted_by_services(), LOCAL_AUDIT_NAME
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as http,
    ):
        await resources.bus.publish(
            codec.encode(AUDIT_RECORD, record(1), correlation_id="1.2.3", message_id="over-the-bus")
        )
        for _ in range(200):
            if (await http.get("/api/audit/entries/0")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        appended = await client.append("over-the-channel", record(2))
        again = await client.append("over-the-bus", record(1))
        await client.close()
        entry = (await http.get(f"/api/audit/entries/{appended.sequence}")).json()
    assert (appended.sequence, appended.duplicate) == (1, False)
    assert (again.sequence, again.duplicate) == (0, True)
    assert entry["key"] == "over-the-channel"
    assert entry["record"]["sop_instance_uid"] == "1.2.3.2"


async def test_the_channel_audit_trail_appends_envelopes_and_says_when_it_could_not(server: Server) -> None:
    trail = ChannelAuditTrail(server.client(attempts=1, timeout=5.0))
    await trail.record(codec.encode(AUDIT_RECORD, record(5), correlation_id="1.2.3", message_id="m5"))
    stored = await server.log.entry_by_key("m5")
    assert stored is not None
    assert events_pb2.AuditRecord.FromString(stored.data) == record(5)
    await server.api.stop()
    with pytest.raises(PublishError, match="audit record m6 not appended"):
        await trail.record(codec.encode(AUDIT_RECORD, record(6), correlation_id="1.2.3", message_id="m6"))
    await trail.close()
    assert await server.log.size() == 1


def test_the_audit_trail_is_the_bus_unless_a_channel_is_configured(tmp_path: Path) -> None:
    resources = embedded_resources(tmp_path)
    assert isinstance(resources.audit_trail, BusAuditTrail)
    assert isinstance(
        build_audit_trail(resources.settings, resources.bus, AuditTrailSettings()), BusAuditTrail
    )
    local = build_audit_trail(resources.settings, resources.bus, AuditTrailSettings(target="127.0.0.1:1"))
    assert isinstance(local, ChannelAuditTrail)
    assert (tmp_path / "audit-channel" / "services.json").exists()  # local mode: keys made in the data dir
    production = CoreSettings(
        data_dir=tmp_path, mode="production", jwt_secret=SecretStr("a-production-secret-0123456789abcdef")
    )
    with pytest.raises(ChannelKeyError, match="LUCERNA_AUDIT_CHANNEL_IDENTITY_FILE"):
        build_audit_trail(production, resources.bus, AuditTrailSettings(target="audit:8097"))
