"""The platform under test, started as a user starts it: embedded defaults, or on the real servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.platform import LucernaProcess, real_server_settings


def _start(kind: str, request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> LucernaProcess:
    name = request.module.__name__.rsplit(".", 1)[-1]
    settings = {"LUCERNA_INGESTION_QUIET_PERIOD_SECONDS": "0.5"}
    if kind == "servers":
        # A virtual host per module: no module's platform sees events another module left queued.
        settings |= real_server_settings(
            request.getfixturevalue("mongodb_url"),
            request.getfixturevalue("elasticsearch_url"),
            request.getfixturevalue("rabbitmq").vhost_url(f"e2e_{name}"),
            f"e2e_{name}",
        )
        # Audit records over the audit service's gRPC append API and the post-quantum channel
        # (ADR 0017; local-mode keys in the data dir); "embedded" keeps them on the bus.
        channel = f"127.0.0.1:{_free_port()}"
        settings |= {"LUCERNA_AUDIT_GRPC_LISTEN": channel, "LUCERNA_AUDIT_CHANNEL_TARGET": channel}
    # A module may add settings (``platform_settings(request)``, e.g. a server it starts) and run a
    # subset of the services (``PLATFORM_SERVICES``), e.g. to read a queue itself.
    extra = getattr(request.module, "platform_settings", None)
    if extra is not None:
        settings |= extra(request)
    only = getattr(request.module, "PLATFORM_SERVICES", None)
    process = LucernaProcess(Path(tmp.mktemp(f"lucerna-{kind}")), settings, only=only)
    process.start(timeout=180)
    return process


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module", params=["embedded", "servers"])
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LucernaProcess]:
    """`lucerna up` on SQLite + in-process bus, or on FerretDB + Elasticsearch + RabbitMQ."""
    process = _start(request.param, request, tmp_path_factory)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def servers_platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LucernaProcess]:
    """`lucerna up` on the real servers only, for what only they let a test observe (RabbitMQ queues)."""
    process = _start("servers", request, tmp_path_factory)
    yield process
    process.stop()
