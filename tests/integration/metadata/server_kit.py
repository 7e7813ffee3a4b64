"""Resources of the metadata service on the real servers (FerretDB and Elasticsearch)."""

from pathlib import Path

from lucerna.core.auth import Authenticator
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.elastic import ElasticSearchIndex
from lucerna.core.storage.mongo import MongoMetadataStore


def server_resources(
    folder: Path, mongodb_url: str, database: str, elasticsearch_url: str, index: str
) -> Resources:
    """Resources on the session's FerretDB and Elasticsearch (not started)."""
    settings = CoreSettings(data_dir=folder, auth_required=False)
    return Resources(
        settings=settings,
        auth=Authenticator(settings),
        bus=InProcessBus(),
        blobs=FilesystemBlobStore(folder / "blobs"),
        metadata=MongoMetadataStore(mongodb_url, database),
        search=ElasticSearchIndex(elasticsearch_url, index),
    )
