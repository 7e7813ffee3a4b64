"""The client of the audit service's append API over the post-quantum channel (ADR 0017).

One long-lived ``Session`` stream carries every append: the channel handshake first (this side is the
initiator and pins the audit service's key), then one encrypted ``AppendRequest`` per append, many in
flight at once, matched to their ``AppendResponse`` by ``request_id``. When the stream breaks (the
server restarts, a record is refused, the network drops) the appends in flight are sent again on a
new session with a new handshake: an append is idempotent by its message id, so a retried append that
had already landed answers its first place, marked duplicate.

Local keys: on one host (``lucerna up``) the platform's services and the audit service share the data
directory, so both sides can create and pin each other's identity there (``local_channel_keys``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
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
    """One stream after its handshake: sends requests, a reader task resolves their responses."""

    def __init__(self, call: Any, channel: Channel) -> None:
        self._call = call
        self._channel = channel
        self._writing = asyncio.Lock()
        self._waiting: dict[int, asyncio.Future[auditlog_pb2.AppendResponse]] = {}
        self.broken: str | None = None
        self._reader = asyncio.create_task(self._read(), name="audit-channel-reader")

    async def request(self, request: auditlog_pb2.AppendRequest) -> auditlog_pb2.AppendResponse:
        if self.broken is not None:
            raise _BrokenError(self.broken)
        answered: asyncio.Future[auditlog_pb2.AppendResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = answered
        try:
            async with self._writing:  # one write at a time; records leave in sequence order
                frame = auditlog_pb2.Frame(data=self._channel.encrypt(request.SerializeToString()))
                await self._call.write(frame)
            return await answered
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ChannelError) as error:
            # InvalidStateError: the call had already ended when this write came.
            self._break(f"the session failed: {_describe(error)}")
            raise _BrokenError(self.broken) from None
        finally:
            self._waiting.pop(request.request_id, None)

    async def _read(self) -> None:
        try:
            while (frame := await self._call.read()) is not grpc.aio.EOF:
                response = auditlog_pb2.AppendResponse()
                response.ParseFromString(self._channel.decrypt(frame.data))
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
        for answered in self._waiting.values():
            if not answered.done():
                answered.set_exception(_BrokenError(reason))

    async def close(self) -> None:
        self._break("the client closed the session", closing=True)
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


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
    ) -> None:
        self._target = target
        self._identity = identity
        self._trusted = trusted
        self._expected_peer = expected_peer
        self._attempts = attempts
        self._timeout = timeout
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._grpc: grpc.aio.Channel | None = None
        self._session: _Session | None = None
        self._opening = asyncio.Lock()
        self._request_ids = itertools.count(1)
        self.handshakes = 0

    async def append(self, message_id: str, record: events_pb2.AuditRecord) -> auditlog_pb2.AppendResponse:
        """Append ``record`` under ``message_id``; its sequence number, or ``AuditChannelError``."""
        request = auditlog_pb2.AppendRequest(request_id=next(self._request_ids), message_id=message_id)
        request.record.CopyFrom(record)
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
            await self._session.close()
            self._session = None
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def _open(self) -> _Session:
        async with self._opening:  # concurrent appends wait for one handshake
            if self._session is not None and self._session.broken is None:
                return self._session
            if self._session is not None:
                await self._session.close()
                self._session = None
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
        return _Session(call, channel)


async def _status(call: Any) -> str:
    return f"{(await call.code()).name}: {await call.details()}"


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
