"""Wiring: build the adapters the settings ask for (embedded defaults or real servers)."""

from __future__ import annotations

from lucerna.core.audit_trail import build_audit_trail
from lucerna.core.auth import Authenticator
from lucerna.core.events.ports import MessageBus
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.ports import MetadataStore, SearchIndex


def build_resources(settings: CoreSettings) -> Resources:
    """Adapters for these settings, not yet started."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    bus = _bus(settings)
    return Resources(
        settings=settings,
        auth=Authenticator(settings),
        bus=bus,
        blobs=FilesystemBlobStore(settings.blobs_path),
        metadata=_metadata(settings),
        search=_search(settings),
        audit=build_audit_trail(settings, bus),
    )


def _bus(settings: CoreSettings) -> MessageBus:
    if settings.bus_backend == "rabbitmq":
        from lucerna.core.events.rabbitmq import RabbitMqBus  # noqa: PLC0415 - optional server adapter

        return RabbitMqBus(settings.rabbitmq_url.get_secret_value())
    from lucerna.core.events.inprocess import InProcessBus  # noqa: PLC0415

    return InProcessBus(max_held=settings.bus_max_held_messages)


def _metadata(settings: CoreSettings) -> MetadataStore:
    if settings.metadata_backend == "mongodb":
        from lucerna.core.storage.mongo import MongoMetadataStore  # noqa: PLC0415

        return MongoMetadataStore(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    from lucerna.core.storage.sqlite import SqliteMetadataStore  # noqa: PLC0415

    return SqliteMetadataStore(settings.data_dir / "metadata.sqlite")


def _search(settings: CoreSettings) -> SearchIndex:
    if settings.search_backend == "elasticsearch":
        from lucerna.core.storage.elastic import ElasticSearchIndex  # noqa: PLC0415

        return ElasticSearchIndex(settings.elasticsearch_url.get_secret_value(), settings.elasticsearch_index)
    from lucerna.core.storage.sqlite import SqliteSearchIndex  # noqa: PLC0415

    return SqliteSearchIndex(settings.data_dir / "search.sqlite")
