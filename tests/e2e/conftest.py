"""The platform under test, started as a user starts it: embedded defaults, or on the real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.platform import LucernaProcess


@pytest.fixture(scope="module", params=["embedded", "servers"])
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LucernaProcess]:
    """`lucerna up` on SQLite + in-process bus, or on FerretDB + Elasticsearch + RabbitMQ."""
    settings = {"LUCERNA_INGESTION_QUIET_PERIOD_SECONDS": "0.5"}
    if request.param == "servers":
        settings |= {
            "LUCERNA_METADATA_BACKEND": "mongodb",
            "LUCERNA_MONGODB_URL": request.getfixturevalue("mongodb_url"),
            "LUCERNA_MONGODB_DATABASE": f"e2e_{request.module.__name__.rsplit('.', 1)[-1]}",
            "LUCERNA_SEARCH_BACKEND": "elasticsearch",
            "LUCERNA_ELASTICSEARCH_URL": request.getfixturevalue("elasticsearch_url"),
            "LUCERNA_ELASTICSEARCH_INDEX": f"e2e-{request.module.__name__.rsplit('.', 1)[-1]}".lower(),
            "LUCERNA_BUS_BACKEND": "rabbitmq",
            "LUCERNA_RABBITMQ_URL": request.getfixturevalue("rabbitmq_url"),
        }
    process = LucernaProcess(Path(tmp_path_factory.mktemp(f"lucerna-{request.param}")), settings)
    process.start()
    yield process
    process.stop()
