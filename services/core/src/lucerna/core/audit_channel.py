"""The client of the audit service's append API over the post-quantum channel (ADR 0017).

One long-lived ``Session`` stream carries every append: the channel handshake first (this side is the
initiator and pins the audit service's key), then encrypted ``AppendBatch`` records, many appends in
flight at once, matched to their ``AppendResponse`` by ``request_id``. Batching is what makes the
channel fast: Python gRPC costs far more per message than per byte, so one writer task sends whatever
appends queued up while the previous frame was being written, as one batch (at most ``max_batch``
requests and the message limit), and a lone append leaves at once, without waiting for company. When
the stream breaks (the server restarts, a record is refused, the network drops) the appends in flight
are sent again on a new session with a new handshake: an append is idempotent by its message id, so a
retried append that had already landed answers its first place, marked duplicate.

Local keys: on one host (``lucerna up``) the platform's services and the audit service share the data
directory, so both sides can create and pin each other's identity there (``local_channel_keys``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from lucerna.auditlog.v1 import auditlog_pb2, auditlog_pb2_grpc
from lucerna.core.pqchannel import Channel, ChannelError, Identity, Initiator, TrustStore
from lucerna.core.pqchannel_keys import load_or_create_identity
from lucerna.events.v1 import events_pb2

log = logging.getLogger(__name__)

LOCAL_KEY_DIR = "audit-channel"
LOCAL_AUDIT_NAME = "lucerna.local/audit"
LOCAL_SERVICES_NAME = "lucerna.local/services"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_MAX_BATCH = 256
# What a batch's plaintext may not use of the message limit: the channel record's header and GCM tag
# (25 bytes) and the Frame's field header, rounded up.
RECORD_OVERHEAD_BYTES = 64
# A request's field header inside the batch: its tag and length (at most 1 + 3 bytes under 2 MiB).
_REQUEST_HEADER_BYTES = 4


class AuditChannelError(Exception):
    """An append that did not reach the log: the channel could not be opened, or the log refused it."""


@dataclass(frozen=True)
class LocalChannelKeys:
    """Both ends' identities, kept in the data directory on a single host."""

    audit: Identity
    services: Identity

    def trusted_by_services(self) -> dict[str, bytes]:
        """What the services pin: the audit service's key."""
        return {self.audit.name: self.audit.public_key}

    def trusted_by_audit(self) -> dict[str, bytes]:
        """What the audit service pins: the services' key."""
        return {self.services.name: self.services.public_key}


def local_channel_keys(data_dir: Path) -> LocalChannelKeys:
    """The identities in ``<data_dir>/audit-channel``, created (0600) by whichever side needs one first."""
    folder = data_dir / LOCAL_KEY_DIR
    return LocalChannelKeys(
        load_or_create_identity(folder / "audit.json", LOCAL_AUDIT_NAME),
        load_or_create_identity(folder / "services.json", LOCAL_SERVICES_NAME),
    )


class _BrokenError(Exception):
    """The session ended under an append; it is retried on a new one."""


class _Session:
    """One stream after its handshake: a writer task sends queued requests in batches, a reader task
    resolves their responses."""

    def __init__(self, call: Any, channel: Channel, *, max_batch: int, max_batch_bytes: int) -> None:
        self._call = call
        self._channel = channel
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._queued: deque[auditlog_pb2.AppendRequest] = deque()
        self._has_queued = asyncio.Event()
        self._waiting: dict[int, asyncio.Future[auditlog_pb2.AppendResponse]] = {}
        self.broken: str | None = None
        self.records_sent = 0
        self._reader = asyncio.create_task(self._read(), name="audit-channel-reader")
        self._writer = asyncio.create_task(self._write(), name="audit-channel-writer")

    async def request(self, request: auditlog_pb2.AppendRequest) -> auditlog_pb2.AppendResponse:
        if self.broken is not None:
            raise _BrokenError(self.broken)
        answered: asyncio.Future[auditlog_pb2.AppendResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = answered
        self._queued.append(request)
        self._has_queued.set()
        try:
            return await answered
        finally:
            self._waiting.pop(request.request_id, None)

    async def _write(self) -> None:
        """Send the queue, one batch per frame, as fast as the stream takes them."""
        try:
            while True:
                await self._has_queued.wait()
                batch = self._next_batch()
                if not self._queued:
                    self._has_queued.clear()
                record = self._channel.encrypt(batch.SerializeToString())
                await self._call.write(auditlog_pb2.Frame(data=record))
                self.records_sent += 1
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ChannelError) as error:
            # InvalidStateError: the call had already ended when this write came.
            self._break(f"the session failed: {_describe(error)}")

    def _next_batch(self) -> auditlog_pb2.AppendBatch:
        """The oldest queued requests, within the batch limits (``append`` refuses a request that
        could not fit alone)."""
        batch = auditlog_pb2.AppendBatch()
        size = 0
        while self._queued and len(batch.requests) < self._max_batch:
            size += self._queued[0].ByteSize() + _REQUEST_HEADER_BYTES
            if batch.requests and size > self._max_batch_bytes:
                break
            batch.requests.append(self._queued.popleft())
        return batch

    async def _read(self) -> None:
        try:
            while (frame := await self._call.read()) is not grpc.aio.EOF:
                results = auditlog_pb2.AppendResults()
                results.ParseFromString(self._channel.decrypt(frame.data))
                for response in results.responses:
                    answered = self._waiting.get(response.request_id)
                    if answered is not None and not answered.done():
                        answered.set_result(response)
            self._break(f"the audit service ended the session ({await _status(self._call)})")
        except (grpc.aio.AioRpcError, ChannelError, DecodeError) as error:
            self._break(f"the session failed: {_describe(error)}")

    def _break(self, reason: str, *, closing: bool = False) -> None:
        if self.broken is None:
            self.broken = reason
            if not closing:
                log.warning("audit channel session ended: %s", reason)
        self._queued.clear()  # their callers are told below, and send them again on a new session
        self._has_queued.clear()
        for answered in self._waiting.values():
            if not answered.done():
                answered.set_exception(_BrokenError(reason))

    async def close(self) -> None:
        self._break("the client closed the session", closing=True)
        self._call.cancel()
        self._reader.cancel()
        self._writer.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


class AuditChannelClient:
    """Appends audit records to the audit service over one long-lived channel session."""

    def __init__(
        self,
        target: str,
        identity: Identity,
        trusted: TrustStore,
        expected_peer: str,
        *,
        attempts: int = 3,
        timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._target = target
        self._identity = identity
        self._trusted = trusted
        self._expected_peer = expected_peer
        self._attempts = attempts
        self._timeout = timeout
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._max_batch = max_batch
        self._max_batch_bytes = max_message_bytes - RECORD_OVERHEAD_BYTES
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._grpc: grpc.aio.Channel | None = None
        self._session: _Session | None = None
        self._opening = asyncio.Lock()
        self._request_ids = itertools.count(1)
        self.handshakes = 0
        self._records_sent_before = 0  # by the sessions before the current one

    @property
    def records_sent(self) -> int:
        """Channel records (frames) that carried requests, over every session so far."""
        current = self._session.records_sent if self._session is not None else 0
        return self._records_sent_before + current

    async def append(self, message_id: str, record: events_pb2.AuditRecord) -> auditlog_pb2.AppendResponse:
        """Append ``record`` under ``message_id``; its sequence number, or ``AuditChannelError``."""
        request = auditlog_pb2.AppendRequest(request_id=next(self._request_ids), message_id=message_id)
        request.record.CopyFrom(record)
        if (size := request.ByteSize() + _REQUEST_HEADER_BYTES) > self._max_batch_bytes:
            # Refused here: sent, it would exceed the message limit and end the session for every append.
            raise AuditChannelError(
                f"audit record {message_id} is {size} bytes; the channel carries at most "
                f"{self._max_batch_bytes} per request"
            )
        problem = "no attempt was made"
        async with asyncio.timeout(self._timeout):
            for attempt in range(self._attempts):
                if attempt:
                    await asyncio.sleep(0.05 * 2**attempt)
                try:
                    response = await (await self._open()).request(request)
                except _BrokenError as error:
                    problem = str(error)
                    continue
                if response.error:
                    raise AuditChannelError(f"the audit log refused {message_id}: {response.error}")
                return response
        raise AuditChannelError(f"appending {message_id} failed {self._attempts} times; last: {problem}")

    async def close(self) -> None:
        """End the session and the connection."""
        if self._session is not None:
            await self._end_session(self._session)
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def _open(self) -> _Session:
        session = self._session
        if session is not None and session.broken is None:
            return session  # without a yield, so that a burst of appends queues up for one batch
        async with self._opening:  # concurrent appends wait for one handshake
            if self._session is not None and self._session.broken is None:
                return self._session
            if self._session is not None:
                await self._end_session(self._session)
            if self._grpc is None:
                self._grpc = grpc.aio.insecure_channel(self._target, options=self._options)
            stub = auditlog_pb2_grpc.AuditLogStub(self._grpc)  # type: ignore[no-untyped-call]
            self._session = await self._handshake(stub)
            return self._session

    async def _handshake(self, stub: Any) -> _Session:
        call = stub.Session()
        initiator = Initiator(self._identity, self._trusted, self._expected_peer)
        try:
            await call.write(auditlog_pb2.Frame(data=initiator.start()))
            message2 = await call.read()
            if message2 is grpc.aio.EOF:
                raise _BrokenError(f"handshake refused by the audit service ({await _status(call)})")
            message3, channel = await asyncio.to_thread(initiator.finish, message2.data)
            await call.write(auditlog_pb2.Frame(data=message3))
        except ChannelError as error:
            call.cancel()
            raise _BrokenError(f"the audit service failed the handshake: {error}") from None
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as error:
            call.cancel()
            raise _BrokenError(f"handshake failed: {_describe(error)}") from None
        self.handshakes += 1
        return _Session(call, channel, max_batch=self._max_batch, max_batch_bytes=self._max_batch_bytes)

    async def _end_session(self, session: _Session) -> None:
        await session.close()
        self._records_sent_before += session.records_sent
        self._session = None


async def _status(call: Any) -> str:
    return f"{(await call.code()).name}: {await call.details()}"


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
