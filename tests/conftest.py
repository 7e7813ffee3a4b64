"""Suite-wide setup: folder markers, and the real servers shared by the integration and e2e tests.

Each server starts once per session, only when a test asks for it, and stops at the end. A server
that cannot start fails every test that needs it, with the server's log tail; nothing is skipped.
The servers come from ``infra/local/install.sh`` (``make setup``). When another session on the
machine holds a server's ports, the next free block of ports is used (fixtures expose URLs and
ports, so tests never hard-code them); ``LUCERNA_TEST_PORT_OFFSET`` picks the first block, and
``LUCERNA_KEEP_SERVER_DATA=1`` keeps the servers' folders for a post-mortem.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pymongo import AsyncMongoClient

_TESTS_DIR = Path(__file__).resolve().parent
# infra/local/servers.py is a stdlib-only script (it runs before `uv sync`), not a package.
sys.path.insert(0, str(_TESTS_DIR.parent / "infra" / "local"))

import servers  # noqa: E402

_FOLDER_MARKERS = {"unit": pytest.mark.unit, "e2e": pytest.mark.e2e, "bench": pytest.mark.bench}
_PORT_STEP = 10
_PORT_BLOCKS = 20
S = TypeVar("S", bound=servers.Server)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by top-level folder so that ``-m unit`` etc. select them (integration: its conftest)."""
    for item in items:
        try:
            folder = item.path.resolve().relative_to(_TESTS_DIR).parts[0]
        except (ValueError, IndexError):
            continue
        marker = _FOLDER_MARKERS.get(folder)
        if marker is not None:
            item.add_marker(marker)


def _start(make: Callable[[int], S]) -> S:
    """Start a server on the first block of free ports, or fail the requesting tests loudly."""
    first = int(os.environ.get("LUCERNA_TEST_PORT_OFFSET", "0"))
    for block in range(_PORT_BLOCKS):
        server = make(first + block * _PORT_STEP)
        if not all(servers.port_is_free(port) for port in server.ports):
            continue
        try:
            server.start()
        except servers.ServerError as error:
            failure = str(error)
        else:
            return server
        server.stop()
        if all(servers.port_is_free(port) for port in server.ports):
            pytest.fail(f"{server.name} could not start:\n{failure}", pytrace=False)
        # Another session took the ports between the check and the start: try the next block.
    pytest.fail(f"no free block of ports for a test server after {_PORT_BLOCKS} tries", pytrace=False)


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    """One folder per session for every server's data and logs, removed at the end."""
    # Under /tmp and world-searchable: under root, Elasticsearch runs as an unprivileged user.
    path = Path(tempfile.mkdtemp(prefix="lucerna-servers-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if os.environ.get("LUCERNA_KEEP_SERVER_DATA") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq(servers_dir: Path) -> Iterator[servers.RabbitMQ]:
    """The RabbitMQ broker: ``.url``, and ``.restart()`` that keeps durable queues and messages.

    ``restart()`` blocks for several seconds: from async code, ``await asyncio.to_thread(rabbitmq.restart)``.
    """
    server = _start(lambda offset: servers.RabbitMQ(servers_dir, port_offset=offset))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq: servers.RabbitMQ) -> str:
    """AMQP URL of the session's broker (guest over loopback)."""
    return rabbitmq.url


@pytest.fixture(scope="session")
def elasticsearch(servers_dir: Path) -> Iterator[servers.Elasticsearch]:
    """The Elasticsearch node (single node, security off, integ-test zip: core modules only)."""
    server = _start(lambda offset: servers.Elasticsearch(servers_dir, port_offset=offset))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def elasticsearch_url(elasticsearch: servers.Elasticsearch) -> str:
    """HTTP URL of the session's Elasticsearch node."""
    return elasticsearch.url


@pytest.fixture(scope="session")
def ferretdb(servers_dir: Path) -> Iterator[servers.FerretDB]:
    """The MongoDB wire-protocol server (FerretDB v1 on SQLite)."""
    server = _start(lambda offset: servers.FerretDB(servers_dir, port_offset=offset))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongodb_url(ferretdb: servers.FerretDB) -> str:
    """``mongodb://127.0.0.1:<port>/`` of the session's FerretDB."""
    return ferretdb.url


@pytest.fixture
async def mongodb_database(mongodb_url: str) -> AsyncIterator[str]:
    """A fresh database name on the session's FerretDB, dropped after the test."""
    name = f"lucerna_test_{uuid.uuid4().hex[:12]}"
    yield name
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    await client.drop_database(name)
    await client.close()


@pytest.fixture(scope="session")
def orthanc(servers_dir: Path) -> Iterator[servers.Orthanc]:
    """Orthanc with DICOMweb: ``.http_url``, ``.dicomweb_url``, ``.dicom_port``, ``.ae_title``, and
    ``.add_modality(name, aet, host, port)`` to let it send to a DICOM node (e.g. Lucerna's SCP)."""
    server = _start(lambda offset: servers.Orthanc(servers_dir, port_offset=offset))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fhir_peer(servers_dir: Path) -> Iterator[servers.FhirPeer]:
    """A second, independent FHIR R4 server (HAPI FHIR, in memory), standing in for a hospital's:
    ``.url`` (the base, ``.../fhir``), ``.fail(status, count)`` / ``.ok()`` to make it refuse requests,
    ``.reset()`` to forget everything, ``.requests()`` for what it saw, ``.stop()`` / ``.start()``."""
    server = _start(lambda offset: servers.FhirPeer(servers_dir, port_offset=offset))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fabric(servers_dir: Path) -> Iterator[servers.FabricNetwork]:
    """A Hyperledger Fabric v2.5 network (one Raft orderer, peers of Org1MSP and Org2MSP, channel
    ``lucerna``) with the anchors chaincode deployed as a service: ``.invoke(fn, *args)`` (endorsed
    by both orgs, waits for the commit) and ``.query(fn, *args)`` as Org1's User1, ``.orgs`` (peer
    addresses, TLS roots, identities), ``.orderer_address``, ``.channel``, ``.chaincode``."""
    server = _start(lambda offset: servers.FabricNetwork(servers_dir, port_offset=offset))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def anchor_service(servers_dir: Path, fabric: servers.FabricNetwork) -> Iterator[servers.AnchorService]:
    """The anchor service (services/anchor, gRPC ``lucerna.anchoring.v1.Anchors``, plaintext) on the
    session's Fabric network as Org1's User1 (the chaincode's admin MSP): ``.address`` (host:port)
    and ``.token`` (every call needs metadata ``authorization: Bearer <token>``). Started once both
    orgs' peers endorse through the Fabric Gateway."""
    server = _start(lambda offset: servers.AnchorService(servers_dir, fabric, port_offset=offset))
    yield server
    server.stop()


class LocalTriton:
    """The local Triton server (PyTriton: ``python -m lucerna.inference.local_triton``) over a model
    repository: ``.grpc_url`` (host:port), ``.http_url``, ``.stop()`` and ``.start()`` (down, then back)."""

    name = "triton"
    START_TIMEOUT = 120.0

    def __init__(self, base_dir: Path, repository: Path, *, port_offset: int = 0) -> None:
        self.base_dir = base_dir
        self.repository = repository
        self.grpc_port = 18801 + port_offset
        self.http_port = 18800 + port_offset
        self.metrics_port = 18802 + port_offset
        self.ports = (self.grpc_port, self.http_port, self.metrics_port)
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log = base_dir / f"triton-{self.grpc_port}.log"
        # The token of Triton's restricted protocols (shared memory), for clients on this host.
        self.access_token = secrets.token_urlsafe(24)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until every model is ready; ``ServerError`` with the log tail if not."""
        from lucerna.inference import local_triton  # noqa: PLC0415 - imported by sessions that ask for Triton

        line = local_triton.command(
            self.repository,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            onnx_threads=1,
        )
        environment = os.environ | {local_triton.ACCESS_TOKEN_VARIABLE: self.access_token}
        with self.log.open("ab") as output:
            self._process = subprocess.Popen(
                line, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=environment
            )
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self.ready():
                return
            time.sleep(0.25)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        self.stop()
        raise servers.ServerError(f"the local Triton server did not become ready:\n{tail}")

    def ready(self) -> bool:
        """Whether every model of the repository answers ready over HTTP (PyTriton's server is up, and
        answers /v2/health/ready, before its models are loaded)."""
        models = sorted(path.parent.name for path in self.repository.glob("*/lucerna.yaml"))
        try:
            for model in models:
                url = f"{self.http_url}/v2/models/{model}/ready"
                with urllib.request.urlopen(url, timeout=1.0) as answer:
                    if answer.status != 200:
                        return False
        except OSError:
            return False
        return bool(models)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s) and wait until its ports are free."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        deadline = time.monotonic() + 10
        while not all(servers.port_is_free(port) for port in self.ports) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="session")
def triton(servers_dir: Path) -> Iterator[LocalTriton]:
    """The local Triton server serving ``infra/triton/models`` (real PyTriton, onnxruntime on CPU)."""
    repository = _TESTS_DIR.parent / "infra" / "triton" / "models"
    server = _start(lambda offset: LocalTriton(servers_dir, repository, port_offset=offset))
    yield server
    server.stop()
