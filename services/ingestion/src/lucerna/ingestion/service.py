"""The ingestion deployable: STOW-RS routes, the DIMSE listener, the study assembly loop and the
audit relay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta

from starlette.routing import BaseRoute

from lucerna.core.service import Resources
from lucerna.ingestion.assembly import StudyAssembler
from lucerna.ingestion.audit import AuditRelay
from lucerna.ingestion.dimse import DimseListener
from lucerna.ingestion.ingest import Ports
from lucerna.ingestion.settings import IngestionSettings
from lucerna.ingestion.stow import StowRs


class IngestionService:
    """DICOM in (DIMSE C-STORE, DICOMweb STOW-RS), ``study.ready`` out."""

    name = "ingestion"

    def __init__(self, settings: IngestionSettings | None = None) -> None:
        self._settings = settings
        self._dimse: DimseListener | None = None
        self._assembly: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None

    @property
    def settings(self) -> IngestionSettings:
        """This service's settings (read from the environment on first use)."""
        if self._settings is None:
            self._settings = IngestionSettings()
        return self._settings

    @property
    def dimse(self) -> DimseListener | None:
        """The running DIMSE listener, if any."""
        return self._dimse

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        """STOW-RS."""
        return StowRs(_ports(resources), resources.auth, self.settings).routes()

    async def start(self, resources: Resources) -> None:
        """Start the DIMSE listener (unless disabled), the study assembly loop and the audit relay."""
        settings = self.settings
        if settings.dimse_enabled:
            self._dimse = DimseListener(
                settings,
                _ports(resources),
                asyncio.get_running_loop(),
                reuse_port=resources.settings.workers > 1,
            )
            self._dimse.start()
        assembler = StudyAssembler(
            resources.metadata,
            resources.bus,
            resources.audit_trail,
            timedelta(seconds=settings.quiet_period_seconds),
            max_idle=timedelta(seconds=settings.max_idle_seconds),
            lease=timedelta(seconds=settings.claim_lease_seconds),
        )
        self._assembly = asyncio.create_task(
            assembler.run(settings.assembly_interval_seconds), name="study-assembly"
        )
        relay = AuditRelay(resources.metadata, resources.audit_trail)
        self._relay = asyncio.create_task(
            relay.run(settings.audit_relay_interval_seconds), name="audit-relay"
        )

    async def stop(self) -> None:
        """Stop listening (ending associations mark their boundaries), then stop assembling and relaying."""
        if self._dimse is not None:
            await asyncio.to_thread(self._dimse.stop)
            self._dimse = None
        for task in (self._assembly, self._relay):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._assembly = self._relay = None


def _ports(resources: Resources) -> Ports:
    return Ports(blobs=resources.blobs, metadata=resources.metadata, audit=resources.audit_trail)


SERVICE = IngestionService()
