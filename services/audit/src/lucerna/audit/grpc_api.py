"""The append API: ``lucerna.auditlog.v1.AuditLog/Session`` over the post-quantum channel (ADR 0017).

A session is one bidirectional gRPC stream. It opens with the channel handshake (``pqchannel``: m1 from
the client, m2 from here, m3 from the client), in which both sides prove their long-term ML-DSA-65 key
against the other's pinned one; after it every frame is one channel record whose plaintext is an
``AppendBatch`` (in) or an ``AppendResults`` (out). A batch's requests are appended concurrently (the
group commit makes them one transaction) and answered together in one frame, or in several when one
would exceed the message limit; batches of a session are handled concurrently, answered in the order
they complete, responses matched by ``request_id``. Every append goes through the audit service's one
``submit`` path, so an append is durable before it is answered and a message id appended twice keeps
its first place.

Refusals: a handshake that fails (unknown client, wrong key, bad signature) ends the call with
UNAUTHENTICATED before anything is appended; so does a record that fails authentication (altered,
replayed, out of the replay window): whoever sent it has not shown they hold the session's keys, and
the session is not trusted further. An authentic plaintext that is not a batch of at least one request
ends it with INVALID_ARGUMENT. A request that carries no usable record gets an ``AppendResponse`` with
``error`` set and nothing appended; the rest of its batch is appended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from lucerna.audit.log import Appended
from lucerna.audit.settings import AuditSettings
from lucerna.auditlog.v1 import auditlog_pb2, auditlog_pb2_grpc
from lucerna.core.audit_channel import DEFAULT_MAX_MESSAGE_BYTES, RECORD_OVERHEAD_BYTES, local_channel_keys
from lucerna.core.pqchannel import Channel, ChannelError, Identity, Responder, TrustStore
from lucerna.core.pqchannel_keys import ChannelKeyError, load_identity, load_trust_store
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2

log = logging.getLogger(__name__)

Submit = Callable[[str, events_pb2.AuditRecord], Awaitable[Appended]]

MAX_MESSAGE_ID_SIZE = 256
HANDSHAKE_TIMEOUT_SECONDS = 10.0
# Sessions are long-lived and never end by themselves; an append in flight commits within milliseconds,
# and one cut off is sent again by its client on a new session (appends are idempotent).
STOP_GRACE_SECONDS = 1.0


class AppendSessions(auditlog_pb2_grpc.AuditLogServicer):
    """The ``Session`` handler: the channel's responder side, then requests to ``submit``."""

    def __init__(
        self,
        identity: Identity,
        trusted: TrustStore,
        submit: Submit,
        *,
        max_in_flight: int = 256,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
    ) -> None:
        self._identity = identity
        self._trusted = trusted
        self._submit = submit
        self._max_in_flight = max_in_flight
        self._max_results_bytes = max_message_bytes - RECORD_OVERHEAD_BYTES
        self._handshake_timeout = handshake_timeout

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802 - gRPC's name
        """One channel session: the handshake, then batches of append requests until the client
        half-closes."""
        del request_iterator  # frames are read with context.read(), beside concurrent writes
        channel = await self._handshake(context)
        in_flight = asyncio.Semaphore(self._max_in_flight)
        writing = asyncio.Lock()
        handling: set[asyncio.Task[None]] = set()

        async def answer(responses: list[auditlog_pb2.AppendResponse]) -> None:
            async with writing:  # one write at a time on the stream; records leave in sequence order
                for plaintext in _results(responses, self._max_results_bytes):
                    await context.write(auditlog_pb2.Frame(data=channel.encrypt(plaintext)))

        def releasing(permits: int) -> Callable[[object], None]:
            def release(_: object) -> None:
                for _ in range(permits):
                    in_flight.release()

            return release

        try:
            while (frame := await context.read()) is not grpc.aio.EOF:
                batch = await self._batch(channel, frame, context)
                # Back-pressure: at most max_in_flight appends per session (a larger batch runs alone).
                permits = min(len(batch.requests), self._max_in_flight)
                for _ in range(permits):
                    await in_flight.acquire()
                task = asyncio.create_task(self._handle(batch, answer))
                handling.add(task)
                task.add_done_callback(handling.discard)
                task.add_done_callback(releasing(permits))
            await asyncio.gather(*handling)  # answer everything asked before the half-close
        finally:
            for task in handling:
                task.cancel()

    async def _handshake(self, context: grpc.aio.ServicerContext) -> Channel:
        responder = Responder(self._identity, self._trusted)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                message1 = await context.read()
                if message1 is grpc.aio.EOF:
                    await _refuse(
                        context, grpc.StatusCode.UNAUTHENTICATED, "the stream ended before the handshake"
                    )
                # ML-KEM encapsulation and an ML-DSA signature: milliseconds of CPU, off the event loop.
                await context.write(
                    auditlog_pb2.Frame(data=await asyncio.to_thread(responder.respond, message1.data))
                )
                message3 = await context.read()
                if message3 is grpc.aio.EOF:
                    await _refuse(
                        context, grpc.StatusCode.UNAUTHENTICATED, "the stream ended during the handshake"
                    )
                channel = await asyncio.to_thread(responder.finish, message3.data)
        except ChannelError as error:
            log.warning("audit channel handshake refused from %s: %s", context.peer(), error)
            await _refuse(context, grpc.StatusCode.UNAUTHENTICATED, f"handshake refused: {error}")
        except TimeoutError:
            await _refuse(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no handshake within {self._handshake_timeout:g} s",
            )
        log.info("audit channel session opened by %s", channel.peer)
        return channel

    async def _batch(
        self, channel: Channel, frame: auditlog_pb2.Frame, context: grpc.aio.ServicerContext
    ) -> auditlog_pb2.AppendBatch:
        try:
            plaintext = channel.decrypt(frame.data)
        except ChannelError as error:
            log.warning("audit channel record from %s refused: %s", channel.peer, error)
            await _refuse(context, grpc.StatusCode.UNAUTHENTICATED, f"record refused: {error}")
        batch = auditlog_pb2.AppendBatch()
        try:
            batch.ParseFromString(plaintext)
        except DecodeError:
            batch.Clear()
        if not batch.requests:
            # Authentic but unusable: a broken or outdated client (a bare AppendRequest parses as an
            # empty batch), and no request id to answer to.
            await _refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "a record's plaintext is not an AppendBatch of at least one request",
            )
        return batch

    async def _handle(
        self,
        batch: auditlog_pb2.AppendBatch,
        answer: Callable[[list[auditlog_pb2.AppendResponse]], Awaitable[None]],
    ) -> None:
        await answer(await asyncio.gather(*(self._append(request) for request in batch.requests)))

    async def _append(self, request: auditlog_pb2.AppendRequest) -> auditlog_pb2.AppendResponse:
        response = auditlog_pb2.AppendResponse(request_id=request.request_id)
        problem = invalid_request(request)
        if problem is not None:
            response.error = problem
        else:
            try:
                appended = await self._submit(request.message_id, request.record)
            except Exception:
                log.exception("appending audit record %s failed", request.message_id)
                response.error = "the log could not append the record (nothing was appended); retry"
            else:
                response.sequence, response.duplicate = appended.seq, not appended.new
        return response


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code``; nothing of it is appended after this."""
    await context.abort(code, details)
    raise AssertionError("ServicerContext.abort returns only by raising")


def _results(responses: list[auditlog_pb2.AppendResponse], max_bytes: int) -> list[bytes]:
    """The serialized ``AppendResults`` answering a batch: one, or halves until each fits ``max_bytes``
    (a batch of refused requests carries an error text each and may not fit in one message)."""
    plaintext = auditlog_pb2.AppendResults(responses=responses).SerializeToString()
    if len(plaintext) <= max_bytes or len(responses) == 1:
        return [plaintext]
    half = len(responses) // 2
    return _results(responses[:half], max_bytes) + _results(responses[half:], max_bytes)


def invalid_request(request: auditlog_pb2.AppendRequest) -> str | None:
    """Why a request carries no usable audit record, or None: an id, an action and its service are needed."""
    if not 0 < len(request.message_id) <= MAX_MESSAGE_ID_SIZE:
        return f"message_id must be 1 to {MAX_MESSAGE_ID_SIZE} characters"
    if not request.HasField("record"):
        return "the request carries no record"
    if request.record.action not in events_pb2.AuditRecord.Action.values() or (
        request.record.action == events_pb2.AuditRecord.ACTION_UNSPECIFIED
    ):
        return f"record action {request.record.action} is not a known action"
    if not request.record.service:
        return "the record does not name the service that emitted it"
    return None


class AppendApi:
    """The gRPC server of the append API: ``start`` binds and serves, ``stop`` drains and closes."""

    def __init__(self, listen: str, sessions: AppendSessions, *, max_message_bytes: int) -> None:
        self._listen = listen
        self._sessions = sessions
        self._max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen on the address (port 0: any free port, then in ``port``) and serve sessions."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", self._max_message_bytes),
            ]
        )
        auditlog_pb2_grpc.add_AuditLogServicer_to_server(self._sessions, server)  # type: ignore[no-untyped-call]
        try:
            self.port = server.add_insecure_port(self._listen)
        except RuntimeError as error:
            raise RuntimeError(f"the audit append API cannot listen on {self._listen}: {error}") from None
        await server.start()
        self._server = server
        log.info("audit append API listening", extra={"listen": self._listen, "port": self.port})

    async def stop(self) -> None:
        """Stop taking sessions; give the appends in flight a moment, then end the open sessions."""
        if self._server is not None:
            await self._server.stop(STOP_GRACE_SECONDS)
            self._server = None


def build_append_api(settings: AuditSettings, core: CoreSettings, submit: Submit) -> AppendApi:
    """The append API for these settings, its keys loaded (``ChannelKeyError`` if unusable), not started."""
    assert settings.grpc_listen is not None
    identity, trusted = channel_keys(settings, core)
    sessions = AppendSessions(
        identity,
        trusted,
        submit,
        max_in_flight=settings.grpc_max_in_flight,
        max_message_bytes=settings.grpc_max_message_bytes,
    )
    return AppendApi(settings.grpc_listen, sessions, max_message_bytes=settings.grpc_max_message_bytes)


def channel_keys(settings: AuditSettings, core: CoreSettings) -> tuple[Identity, TrustStore]:
    """This service's channel identity and the clients it trusts: the configured files, or in local mode
    the identities kept in the data directory (``local_channel_keys``, shared with the services there)."""
    if settings.grpc_identity_file is not None and settings.grpc_trust_file is not None:
        return load_identity(settings.grpc_identity_file), load_trust_store(settings.grpc_trust_file)
    if core.mode == "production":
        raise ChannelKeyError(
            "refusing to start the audit append API in production mode without "
            "LUCERNA_AUDIT_GRPC_IDENTITY_FILE and LUCERNA_AUDIT_GRPC_TRUST_FILE"
        )
    local = local_channel_keys(core.data_dir)
    identity = (
        load_identity(settings.grpc_identity_file) if settings.grpc_identity_file else local.audit
    )
    trusted = (
        load_trust_store(settings.grpc_trust_file)
        if settings.grpc_trust_file
        else local.trusted_by_audit()
    )
    return identity, trusted
