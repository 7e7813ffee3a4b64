"""Where the platform's services send their audit records: the one seam between them and the audit log.

Two adapters, chosen by settings (ADR 0017): ``BusAuditTrail`` publishes the ``audit.record`` event
on the message bus (the default); ``ChannelAuditTrail`` appends it through the audit service's gRPC
append API over the post-quantum channel, when ``LUCERNA_AUDIT_CHANNEL_TARGET`` is set. Both keep the
bus's contract for the callers' outboxes: ``record`` returns once the record is durable (taken by the
broker, or appended to the log), and raises ``PublishError`` otherwise, so the caller keeps the
record and sends it again with the same message id, which the log appends once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic_settings import BaseSettings, SettingsConfigDict

from lucerna.core.audit_channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    LOCAL_AUDIT_NAME,
    AuditChannelClient,
    AuditChannelError,
    local_channel_keys,
)
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope, MessageBus, PermanentError, PublishError
from lucerna.core.pqchannel_keys import ChannelKeyError, load_identity, load_trust_store
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2


class AuditTrail(Protocol):
    """Takes a service's ``audit.record`` envelopes to the audit log."""

    async def record(self, envelope: Envelope) -> None:
        """Durable when it returns; ``PublishError`` when not (send it again later, same message id)."""
        ...

    async def close(self) -> None: ...


class BusAuditTrail:
    """Audit records as events on the bus; the audit service consumes ``audit.records``."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    async def record(self, envelope: Envelope) -> None:
        """Publish the envelope."""
        await self._bus.publish(envelope)

    async def close(self) -> None:
        """Nothing of its own to close: the bus is the process's."""


class ChannelAuditTrail:
    """Audit records appended over the post-quantum channel, keyed by their envelope's message id."""

    def __init__(self, client: AuditChannelClient) -> None:
        self._client = client

    async def record(self, envelope: Envelope) -> None:
        """Append the envelope's record; ``PublishError`` if the log did not take it."""
        try:
            message = codec.decode(envelope, events_pb2.AuditRecord)
        except PermanentError as error:  # a caller's bug, not the channel's: say so, never retry it
            raise ValueError(f"not an audit record: {error}") from None
        try:
            await self._client.append(envelope.message_id, message)
        except (AuditChannelError, TimeoutError) as error:
            raise PublishError(f"audit record {envelope.message_id} not appended: {error}") from error

    async def close(self) -> None:
        """End the channel session."""
        await self._client.close()


class AuditTrailSettings(BaseSettings):
    """How services reach the audit log (``LUCERNA_AUDIT_CHANNEL_*``); unset target: over the bus."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_AUDIT_CHANNEL_", extra="ignore")

    # The audit service's append API (host:port); unset: audit records go over the bus.
    target: str | None = None
    # The audit service's channel name, as pinned in the trust file.
    server_name: str = LOCAL_AUDIT_NAME
    # This service's identity (JSON, mode 0600) and the pinned key of the audit service (JSON: name ->
    # base64 key). Unset in local mode: the identities in <LUCERNA_DATA_DIR>/audit-channel (ADR 0017).
    identity_file: Path | None = None
    trust_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def build_audit_trail(
    core: CoreSettings, bus: MessageBus, settings: AuditTrailSettings | None = None
) -> AuditTrail:
    """The audit trail these settings ask for; ``ChannelKeyError`` if the channel's keys are unusable."""
    settings = settings or AuditTrailSettings()
    if settings.target is None:
        return BusAuditTrail(bus)
    if settings.identity_file is not None and settings.trust_file is not None:
        identity, trusted = load_identity(settings.identity_file), load_trust_store(settings.trust_file)
    elif core.mode == "production":
        raise ChannelKeyError(
            "refusing to send audit records over the channel in production mode without "
            "LUCERNA_AUDIT_CHANNEL_IDENTITY_FILE and LUCERNA_AUDIT_CHANNEL_TRUST_FILE"
        )
    else:
        local = local_channel_keys(core.data_dir)
        identity = load_identity(settings.identity_file) if settings.identity_file else local.services
        trusted = (
            load_trust_store(settings.trust_file) if settings.trust_file else local.trusted_by_services()
        )
    client = AuditChannelClient(
        settings.target, identity, trusted, settings.server_name, max_message_bytes=settings.max_message_bytes
    )
    return ChannelAuditTrail(client)
