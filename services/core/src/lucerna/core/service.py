"""What a deployable is to the runtime: routes to mount, background work to start and stop.

Deployables register an entry point in the ``lucerna.services`` group; ``lucerna up`` runs all of
them in one process, ``lucerna serve <name>`` runs one. No service relies on sharing a process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from starlette.routing import BaseRoute

from lucerna.core.audit_trail import AuditTrail, BusAuditTrail
from lucerna.core.auth import Authenticator
from lucerna.core.events.ports import MessageBus
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.ports import BlobStore, MetadataStore, SearchIndex


@dataclass
class Resources:
    """The adapters a process shares between its services (built by ``bootstrap``)."""

    settings: CoreSettings
    auth: Authenticator
    bus: MessageBus
    blobs: BlobStore
    metadata: MetadataStore
    search: SearchIndex
    audit: AuditTrail | None = None  # None: audit records go over ``bus`` (ADR 0017)

    @property
    def audit_trail(self) -> AuditTrail:
        """Where this process's services send their audit records."""
        return self.audit if self.audit is not None else BusAuditTrail(self.bus)


class Service(Protocol):
    """A deployable: its HTTP routes and its background work (listeners, loops, consumers)."""

    name: str

    def routes(self, resources: Resources) -> Sequence[BaseRoute]: ...

    async def start(self, resources: Resources) -> None:
        """Start background work; return once it is running."""
        ...

    async def stop(self) -> None:
        """Stop background work, finishing or handing back what is in flight."""
        ...


@runtime_checkable
class HasReadiness(Protocol):
    """A service whose own dependencies decide whether it can serve (shown by ``/readyz``)."""

    async def readiness(self) -> dict[str, bool]:
        """Named checks, True when passing (e.g. ``{"triton": False}`` while Triton is down)."""
        ...


@runtime_checkable
class HasCompanion(Protocol):
    """A service that needs a process of its own beside it on the host (e.g. a local Triton).

    The runner (``lucerna up`` / ``lucerna serve``) starts the command once per host, before its
    worker processes, and stops it when it stops; ``None``: nothing to start (e.g. in Kubernetes).
    """

    def companion_command(self, settings: CoreSettings) -> list[str] | None: ...


@runtime_checkable
class HasReindex(Protocol):
    """A service with a derived search index that ``lucerna reindex`` rebuilds from its store."""

    async def reindex(self, resources: Resources) -> str:
        """Open what it needs, rebuild the index from the store and swap it in (searches answer
        throughout; ``ReindexRunningError`` while another reindex runs), close; what was done."""
        ...


def discover() -> dict[str, Service]:
    """The installed deployables by name."""
    found: dict[str, Service] = {}
    for entry in entry_points(group="lucerna.services"):
        found[entry.name] = entry.load()
    return found
