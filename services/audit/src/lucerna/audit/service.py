"""The audit deployable: appends every ``audit.record`` to the Merkle log, signs checkpoints, and
serves entries, proofs, checkpoints and the public keys to auditors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.routing import BaseRoute

from lucerna.audit.accesses import Accesses, build_accesses
from lucerna.audit.anchoring import Anchorer, AnchorStore, GrpcLedger, MongoAnchorStore, SqliteAnchorStore
from lucerna.audit.api import audit_routes
from lucerna.audit.appender import GroupAppender
from lucerna.audit.auditevent_api import auditevent_routes
from lucerna.audit.checkpoints import Checkpoint, SignedCheckpoint, sign
from lucerna.audit.grpc_api import AppendApi, build_append_api
from lucerna.audit.keys import Keyring
from lucerna.audit.local_ledger import plan as plan_local_ledger
from lucerna.audit.log import Appended, AuditLog, LogEntry, MongoAuditLog, SqliteAuditLog
from lucerna.audit.settings import AuditSettings
from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2

log = logging.getLogger(__name__)

AUDIT_QUEUE = "audit.records"
# The local ledger's launcher reads the anchor service's token from the anchor service's own variable.
LEDGER_TOKEN_VARIABLE = "LUCERNA_ANCHOR_TOKEN"  # noqa: S105 -- the variable's name, not a secret
CHECKPOINTER_STOP_SECONDS = 5.0


class Checkpointer:
    """Signs a checkpoint of the log every ``every`` entries or ``interval`` seconds, whichever comes
    first, when the log grew since the last one."""

    def __init__(
        self, audit_log: AuditLog, keyring: Keyring, origin: str, every: int, interval: float
    ) -> None:
        self.log = audit_log
        self.keyring = keyring
        self.origin = origin
        self.every = every
        self.interval = interval
        self.appended = 0
        self.wake = asyncio.Event()
        self.signed = asyncio.Event()  # set after each new checkpoint (the anchorer waits on it)

    def counted(self, outcomes: Sequence[Appended]) -> None:
        """Count new entries; wake the loop once ``every`` have arrived."""
        self.appended += sum(1 for outcome in outcomes if outcome.new)
        if self.appended >= self.every:
            self.wake.set()

    async def checkpoint(self) -> Checkpoint | None:
        """Sign and keep a checkpoint of the log as it is, unless the latest already covers it."""
        self.appended = 0
        size = await self.log.size()
        latest = await self.log.latest_checkpoint()
        if size == 0 or (latest is not None and latest.checkpoint.size >= size):
            return None
        checkpoint = Checkpoint(self.origin, size, await self.log.root(size))
        # ML-DSA-65 signing takes milliseconds of CPU: off the event loop, with the look for a
        # rotated key (a directory listing every few seconds at most) before it.
        signed = await asyncio.to_thread(self._sign, checkpoint)
        await self.log.add_checkpoint(signed)
        self.signed.set()
        return checkpoint

    def _sign(self, checkpoint: Checkpoint) -> SignedCheckpoint:
        """Signed by the newest key in the key directory (a rotation takes effect without a restart)."""
        self.keyring.refresh()
        return sign(checkpoint, self.keyring.active)

    async def run(self, stopping: asyncio.Event) -> None:
        """Checkpoint until ``stopping`` is set."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval)
            self.wake.clear()
            try:
                await self.checkpoint()
            except Exception:
                log.exception("signing a checkpoint failed; retrying")


class AuditService:
    """``audit.record`` in, a verifiable log out."""

    name = "audit"

    def __init__(self, settings: AuditSettings | None = None) -> None:
        self._settings = settings
        self._log: AuditLog | None = None
        self._keyring: Keyring | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self._anchors: AnchorStore | None = None
        self._anchorer: Anchorer | None = None
        self._anchoring: asyncio.Task[None] | None = None
        self._appender: GroupAppender[LogEntry, Appended] | None = None
        self._checkpointer: Checkpointer | None = None
        self._append_api: AppendApi | None = None
        self._accesses: Accesses | None = None
        self._stopping = asyncio.Event()

    @property
    def settings(self) -> AuditSettings:
        """This service's settings (read from the environment on first use)."""
        if self._settings is None:
            self._settings = AuditSettings()
        return self._settings

    def companion_command(self, settings: CoreSettings) -> list[str] | None:
        """The local Fabric ledger (``local_ledger.plan``), started once per host by ``lucerna up``/
        ``lucerna serve``; None when anchoring goes elsewhere or nowhere. Points anchoring at it:
        the anchorer retries until the ledger answers."""
        ledger = plan_local_ledger(self.settings, settings)
        if ledger is None:
            return None
        given = self.settings.anchor_token
        token = given.get_secret_value() if given is not None else secrets.token_urlsafe(32)
        # Inherited by the ledger's launcher and by the worker processes forked after it; this
        # process's own service object (one worker) reads its settings already made.
        os.environ.update(
            {
                "LUCERNA_AUDIT_ANCHOR_TARGET": ledger.target,
                "LUCERNA_AUDIT_ANCHOR_TOKEN": token,
                LEDGER_TOKEN_VARIABLE: token,
            }
        )
        self._settings = self.settings.model_copy(
            update={"anchor_target": ledger.target, "anchor_token": SecretStr(token)}
        )
        return ledger.command

    async def readiness(self) -> dict[str, bool]:
        """Started and the log's stores reachable."""
        return {
            "log": self._log is not None and await self._log.ping(),
            "accesses": self._accesses is not None and await self._accesses.ping(),
        }

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        """The auditors' API, and the FHIR AuditEvent search of patient-data accesses."""
        return [
            *audit_routes(resources, lambda: self._log, lambda: self._keyring, lambda: self._anchorer),
            *auditevent_routes(resources, lambda: self._log, lambda: self._accesses, self.settings.origin),
        ]

    async def submit(self, key: str, record: events_pb2.AuditRecord) -> Appended:
        """Append one audit record under its idempotency key: the one path of every append (the
        ``audit.records`` consumer and the gRPC append API); durable when it returns. Its PHI is
        sealed first and the entry holds only the blob's digest; a patient-data access is indexed
        after (``accesses``)."""
        if self._appender is None or self._checkpointer is None or self._accesses is None:
            raise RuntimeError("the audit service is not started")
        appended = await self._appender.append(LogEntry(key, await self._accesses.entry_data(key, record)))
        self._checkpointer.counted([appended])
        await self._accesses.indexed(appended.seq, key, record)
        return appended

    async def start(self, resources: Resources) -> None:
        """Open the log and the keys, consume audit records, start checkpointing."""
        settings = self.settings
        audit_log = build_log(resources.settings)
        await audit_log.start()
        key_dir = settings.key_directory(resources.settings.data_dir)
        keyring = await asyncio.to_thread(Keyring, key_dir, settings.origin)
        accesses = await asyncio.to_thread(build_accesses, resources.settings, key_dir)
        await accesses.start()
        checkpointer = Checkpointer(
            audit_log,
            keyring,
            settings.origin,
            settings.checkpoint_every,
            settings.checkpoint_interval_ms / 1000,
        )
        appender: GroupAppender[LogEntry, Appended] = GroupAppender(audit_log.append)

        async def record(envelope: Envelope) -> None:
            message = codec.decode(envelope, events_pb2.AuditRecord)  # garbage is dead-lettered, never logged
            key = envelope.message_id or "sha256:" + hashlib.sha256(envelope.body).hexdigest()
            await self.submit(key, message)

        self._log, self._keyring = audit_log, keyring
        self._appender, self._checkpointer, self._accesses = appender, checkpointer, accesses
        await resources.bus.consume(AUDIT_QUEUE, record, prefetch=settings.prefetch)
        self._stopping = asyncio.Event()
        self._checkpointing = asyncio.create_task(checkpointer.run(self._stopping), name="audit-checkpointer")
        if settings.anchor_target:
            await self._start_anchoring(resources.settings, audit_log, keyring, checkpointer)
        if settings.grpc_listen:
            self._append_api = build_append_api(settings, resources.settings, self.submit)
            await self._append_api.start()
        log.info("audit service started", extra={"origin": settings.origin, "key": keyring.active.name})

    async def _start_anchoring(
        self, core: CoreSettings, audit_log: AuditLog, keyring: Keyring, checkpointer: Checkpointer
    ) -> None:
        settings = self.settings
        assert settings.anchor_target is not None
        token = settings.anchor_token.get_secret_value() if settings.anchor_token else None
        anchors = build_anchor_store(core)
        await anchors.start()
        ledger = GrpcLedger(settings.anchor_target, token)
        anchorer = Anchorer(audit_log, anchors, ledger, keyring, settings.origin)
        checkpointer.signed = anchorer.wake
        self._anchors, self._anchorer = anchors, anchorer
        self._anchoring = asyncio.create_task(anchorer.run(self._stopping), name="audit-anchorer")

    async def stop(self) -> None:
        """Stop the append API, checkpointing and anchoring, and close the log."""
        if self._append_api is not None:
            await self._append_api.stop()
            self._append_api = None
        self._stopping.set()
        for task in (self._anchoring, self._checkpointing):
            if task is not None:
                await asyncio.wait([task], timeout=CHECKPOINTER_STOP_SECONDS)
                task.cancel()
        self._anchoring = self._checkpointing = None
        if self._anchorer is not None:
            await self._anchorer.ledger.close()
            self._anchorer = None
        if self._anchors is not None:
            await self._anchors.close()
            self._anchors = None
        if self._log is not None:
            await self._log.close()
            self._log = None
        if self._accesses is not None:
            await self._accesses.close()
            self._accesses = None
        self._keyring = None
        self._appender, self._checkpointer = None, None


def build_anchor_store(settings: CoreSettings) -> AnchorStore:
    """Where anchors are recorded, beside the log."""
    if settings.metadata_backend == "mongodb":
        return MongoAnchorStore(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    return SqliteAnchorStore(settings.data_dir / "audit-anchors.sqlite")


def build_log(settings: CoreSettings) -> AuditLog:
    """The log beside the platform's metadata store: MongoDB, or a SQLite file of its own."""
    if settings.metadata_backend == "mongodb":
        return MongoAuditLog(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    return SqliteAuditLog(settings.data_dir / "audit.sqlite")


SERVICE = AuditService()
