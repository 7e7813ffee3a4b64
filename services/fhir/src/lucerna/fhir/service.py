"""The FHIR deployable: publishes results as FHIR resources, serves them at ``/fhir`` and notifies
Subscriptions of new reports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from zoneinfo import ZoneInfo

import httpx
from starlette.routing import BaseRoute

from lucerna.core.events.ports import Envelope
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.fhir.api import fhir_routes
from lucerna.fhir.deliveries import (
    PUSH,
    Delivery,
    DeliveryOutbox,
    DeliveryWorker,
    MongoDeliveryOutbox,
    RetryPolicy,
    SqliteDeliveryOutbox,
)
from lucerna.fhir.event_numbers import EventNumbers, MongoEventNumbers, SqliteEventNumbers
from lucerna.fhir.notifier import Notifier
from lucerna.fhir.publisher import Publisher, Push
from lucerna.fhir.read_audit import ReadAuditor
from lucerna.fhir.repository import Repository
from lucerna.fhir.settings import FhirSettings
from lucerna.fhir.store import ResourceIndex, ResourceStore
from lucerna.fhir.studies import MongoStudyStore, SqliteStudyStore, StudyStore

log = logging.getLogger(__name__)

INFERENCE_COMPLETED_QUEUE = "fhir.inference-completed"
STUDY_READY_QUEUE = "fhir.study-ready"
REPORT_PUBLISHED_QUEUE = "fhir.report-published"
DELIVERY_STOP_SECONDS = 5.0


class ConfigurationError(Exception):
    """A combination of settings the FHIR service cannot run with."""


class FhirService:
    """``study.ready`` and ``inference.completed`` in, FHIR resources out (stored and served);
    ``fhir.report-published`` in, Subscription notifications out."""

    name = "fhir"

    def __init__(self, settings: FhirSettings | None = None) -> None:
        self._settings = settings
        self._repository: Repository | None = None
        self._studies: StudyStore | None = None
        self._outbox: DeliveryOutbox | None = None
        self._numbers: EventNumbers | None = None
        self._notifier: Notifier | None = None
        self._client: httpx.AsyncClient | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._auditor: ReadAuditor | None = None
        self._auditing: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def settings(self) -> FhirSettings:
        """This service's settings (read from the environment on first use)."""
        if self._settings is None:
            self._settings = FhirSettings()
        return self._settings

    @property
    def repository(self) -> Repository | None:
        """The resources, once started."""
        return self._repository

    async def readiness(self) -> dict[str, bool]:
        """Started, and the resource store, the index and the study store reachable."""
        repository, studies, outbox, numbers = self._repository, self._studies, self._outbox, self._numbers
        if repository is None or studies is None or outbox is None or numbers is None:
            return {"store": False}
        return {
            "store": await repository.store.ping(),
            "index": await repository.index.ping(),
            "studies": await studies.ping(),
            "deliveries": await outbox.ping(),
            "subscriptions": await numbers.ping(),
        }

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        """The FHIR REST API under ``/fhir``."""
        base_url = self.settings.base_url
        return fhir_routes(
            resources,
            lambda: self._repository,
            notifier=lambda: self._notifier,
            auditor=lambda: self._auditor,
            base_url=str(base_url) if base_url is not None else None,
        )

    async def start(self, resources: Resources) -> None:
        """Open the stores and consume study, result and published-report events."""
        settings = self.settings
        store, index = build_storage(resources.settings)
        studies = build_study_store(resources.settings)
        outbox = build_outbox(resources.settings)
        numbers = build_event_numbers(resources.settings)
        for part in (store, index, studies, outbox, numbers):
            await part.start()
        repository = Repository(store, index)
        notifier: Notifier | None = None

        async def settled(delivery: Delivery, taken: bool) -> None:
            if notifier is not None:
                await notifier.settled(delivery, taken)

        self._client = httpx.AsyncClient(timeout=settings.delivery_timeout_seconds)
        worker = DeliveryWorker(
            outbox,
            self._client,
            policy=RetryPolicy(
                base=timedelta(seconds=settings.delivery_retry_seconds),
                cap=timedelta(seconds=settings.delivery_retry_max_seconds),
            ),
            headers=_push_headers(settings),
            settled=settled,
        )
        notifier = Notifier(
            repository,
            outbox,
            numbers,
            base_url=str(settings.base_url or ""),
            wake=worker.wake.set,
        )
        push = None
        if settings.push_url is not None:
            push = Push(str(settings.push_url), outbox, wake=worker.wake.set)
        publisher = Publisher(
            repository,
            studies,
            resources.bus,
            resources.audit_trail,
            settings.publishing(),
            push=push,
            site_timezone=ZoneInfo(settings.site_timezone),
        )

        async def study_ready(envelope: Envelope) -> None:
            await publisher.on_study_ready(envelope)

        async def inference_completed(envelope: Envelope) -> None:
            await publisher.on_inference_completed(envelope)

        async def report_published(envelope: Envelope) -> None:
            await notifier.on_report_published(envelope)

        self._repository, self._studies, self._outbox = repository, studies, outbox
        self._numbers, self._notifier = numbers, notifier
        resumed = await notifier.resume()
        bus, prefetch = resources.bus, settings.prefetch
        await bus.consume(STUDY_READY_QUEUE, study_ready, prefetch=prefetch)
        await bus.consume(INFERENCE_COMPLETED_QUEUE, inference_completed, prefetch=prefetch)
        await bus.consume(REPORT_PUBLISHED_QUEUE, report_published, prefetch=prefetch)
        self._stopping = asyncio.Event()
        self._delivering = asyncio.create_task(
            worker.run(settings.delivery_interval_seconds, self._stopping), name="fhir-deliveries"
        )
        self._auditor = ReadAuditor(resources.audit_trail)
        self._auditing = asyncio.create_task(self._auditor.run(self._stopping), name="fhir-read-audit")
        log.info("fhir service started", extra={"push": push is not None, "handshakes_resumed": resumed})

    async def stop(self) -> None:
        """Stop delivering and close the stores (the bus, closed after, returns what is in flight)."""
        if self._delivering is not None:
            self._stopping.set()
            await asyncio.wait([self._delivering], timeout=DELIVERY_STOP_SECONDS)
            self._delivering.cancel()
            self._delivering = None
        if self._auditing is not None:  # publishes what is queued: before the bus closes
            self._stopping.set()
            await asyncio.wait([self._auditing], timeout=DELIVERY_STOP_SECONDS)
            self._auditing.cancel()
            self._auditing = self._auditor = None
        repository, studies, outbox, numbers = self._repository, self._studies, self._outbox, self._numbers
        self._repository = self._studies = self._outbox = None
        self._numbers = self._notifier = None
        closing: list[ResourceStore | ResourceIndex | StudyStore | DeliveryOutbox | EventNumbers | None] = [
            studies,
            outbox,
            numbers,
        ]
        if repository is not None:
            closing += [repository.index, repository.store]  # SQLite: one object; closing twice is harmless
        for part in closing:
            if part is not None:
                await part.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


    async def reindex(self, resources: Resources) -> str:
        """``lucerna reindex``: the FHIR search index, emptied and rebuilt from the resource store."""
        store, index = build_storage(resources.settings)
        await store.start()
        await index.start()
        try:
            count = await Repository(store, index).rebuild_index()
        finally:
            await index.close()
            await store.close()
        return f"reindexed {count} FHIR resources"


def build_storage(settings: CoreSettings) -> tuple[ResourceStore, ResourceIndex]:
    """The resource store beside the platform's metadata store and the index beside its search
    index: SQLite (one file, both), or MongoDB and Elasticsearch."""
    if settings.metadata_backend == "sqlite":
        from lucerna.fhir.sqlite_store import SqliteResources  # noqa: PLC0415 - embedded adapter

        resources = SqliteResources(settings.data_dir / "fhir.sqlite")
        if settings.search_backend == "sqlite":
            return resources, resources
        return resources, _elastic(settings)
    from lucerna.fhir.mongo_store import MongoResourceStore  # noqa: PLC0415 - optional server adapter

    store = MongoResourceStore(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    if settings.search_backend != "elasticsearch":
        raise ConfigurationError(
            "the FHIR service indexes MongoDB-stored resources in Elasticsearch: set "
            "LUCERNA_SEARCH_BACKEND=elasticsearch with LUCERNA_METADATA_BACKEND=mongodb"
        )
    return store, _elastic(settings)


def build_study_store(settings: CoreSettings) -> StudyStore:
    """Where study facts are kept: beside the resource store."""
    if settings.metadata_backend == "mongodb":
        return MongoStudyStore(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    return SqliteStudyStore(settings.data_dir / "fhir-studies.sqlite")


def build_outbox(settings: CoreSettings) -> DeliveryOutbox:
    """Where deliveries wait: beside the resource store."""
    if settings.metadata_backend == "mongodb":
        return MongoDeliveryOutbox(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    return SqliteDeliveryOutbox(settings.data_dir / "fhir-deliveries.sqlite")


def build_event_numbers(settings: CoreSettings) -> EventNumbers:
    """Where Subscriptions' events are numbered: beside the resource store."""
    if settings.metadata_backend == "mongodb":
        return MongoEventNumbers(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    return SqliteEventNumbers(settings.data_dir / "fhir-subscriptions.sqlite")


def _push_headers(settings: FhirSettings) -> Callable[[Delivery], dict[str, str]]:
    token = settings.push_token

    def headers(delivery: Delivery) -> dict[str, str]:
        if delivery.kind == PUSH and token is not None:
            return {"Authorization": f"Bearer {token.get_secret_value()}"}
        return {}

    return headers


def _elastic(settings: CoreSettings) -> ResourceIndex:
    from lucerna.fhir.elastic_index import ElasticResourceIndex  # noqa: PLC0415 - optional server adapter

    return ElasticResourceIndex(
        settings.elasticsearch_url.get_secret_value(), f"{settings.elasticsearch_index}-fhir"
    )


SERVICE = FhirService()
