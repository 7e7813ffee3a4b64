"""Subscriptions end to end on the real pieces: the FHIR API (over ASGI), SQLite resources, the
delivery outbox and event numbers (SQLite, and FerretDB), the delivery worker, and an HTTP receiver
listening on a free port in the test."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import BaseRoute

from lucerna.core.auth import Authenticator
from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.events.ports import Envelope
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.blobs import FilesystemBlobStore
from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex
from lucerna.fhir import events
from lucerna.fhir.api import fhir_routes
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.deliveries import (
    DeliveryOutbox,
    DeliveryWorker,
    MongoDeliveryOutbox,
    RetryPolicy,
    SqliteDeliveryOutbox,
)
from lucerna.fhir.event_numbers import EventNumbers, MongoEventNumbers, SqliteEventNumbers
from lucerna.fhir.notifier import Notifier
from lucerna.fhir.publishing import StudyFacts, imaging_resources, publication, resource_json
from lucerna.fhir.repository import Repository
from lucerna.fhir.sqlite_store import SqliteResources
from lucerna.fhir.store import ResourceWrite, StoredResource
from lucerna.fhir.subscriptions import FILTER_CRITERIA, PAYLOAD_CONTENT, TOPIC
from tests.unit.fhir.kit import SETTINGS, STUDY, completed, nodule, study_ready

pytestmark = pytest.mark.integration

BASE = "https://lucerna.example/fhir"
FHIR_JSON = {"content-type": "application/fhir+json"}
WAIT_SECONDS = 10.0


# --- The receiver --------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def status(self) -> dict[str, Any]:
        """The first entry's Parameters, as {name: parameter}."""
        parameters = self.body["entry"][0]["resource"]["parameter"]
        return {parameter["name"]: parameter for parameter in parameters}

    @property
    def type(self) -> str:
        kind: str = self.status["type"]["valueCode"]
        return kind


class Receiver:
    """An HTTP endpoint: ``/hook`` takes notifications (after failing ``failures`` of them),
    ``/refuse`` answers 400 to everything."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.attempts = 0
        self.failures = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length))
                status = receiver.answer(self.path, dict(self.headers), body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def answer(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> int:
        with self._lock:
            self.attempts += 1
            if path == "/refuse":
                return 400
            if self.failures > 0:
                self.failures -= 1
                return 503
            self.received.append(Received(path, headers, body))
            return 200

    def of_type(self, kind: str) -> list[Received]:
        with self._lock:
            return [item for item in self.received if item.type == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    thread = threading.Thread(target=made.server.serve_forever, daemon=True)
    thread.start()
    yield made
    made.server.shutdown()
    made.server.server_close()


# --- The service's pieces ------------------------------------------------------------------------


class Api:
    """The FHIR API as the service mounts it."""

    name = "fhir"

    def __init__(self, repository: Repository, notifier: Notifier) -> None:
        self.repository = repository
        self.notifier = notifier

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        return fhir_routes(resources, lambda: self.repository, notifier=lambda: self.notifier, base_url=BASE)

    async def start(self, resources: Resources) -> None:
        pass

    async def stop(self) -> None:
        pass


@dataclass
class Fhir:
    client: httpx.AsyncClient
    repository: Repository
    notifier: Notifier
    outbox: DeliveryOutbox
    numbers: EventNumbers


@pytest.fixture(params=["sqlite", "mongodb"])
async def fhir(
    request: pytest.FixtureRequest, tmp_path: Path, mongodb_url: str, mongodb_database: str
) -> AsyncIterator[Fhir]:
    """Resources in SQLite; the outbox and the event numbers in SQLite or FerretDB."""
    outbox: DeliveryOutbox
    numbers: EventNumbers
    if request.param == "sqlite":
        outbox = SqliteDeliveryOutbox(tmp_path / "deliveries.sqlite")
        numbers = SqliteEventNumbers(tmp_path / "subscriptions.sqlite")
    else:
        outbox = MongoDeliveryOutbox(mongodb_url, mongodb_database)
        numbers = MongoEventNumbers(mongodb_url, mongodb_database)
    resources_db = SqliteResources(tmp_path / "fhir.sqlite")
    for part in (resources_db, outbox, numbers):
        await part.start()
    repository = Repository(resources_db, resources_db)
    client = httpx.AsyncClient(timeout=5)
    notifier: Notifier | None = None

    async def settled(delivery: Any, taken: bool) -> None:
        assert notifier is not None
        await notifier.settled(delivery, taken)

    # Fast backoff, so that retries happen within the test.
    policy = RetryPolicy(base=timedelta(milliseconds=100), cap=timedelta(milliseconds=400))
    worker = DeliveryWorker(outbox, client, policy=policy, settled=settled)
    notifier = Notifier(repository, outbox, numbers, base_url=BASE, wake=worker.wake.set)
    stopping = asyncio.Event()
    running = asyncio.create_task(worker.run(0.05, stopping))
    config = CoreSettings(data_dir=tmp_path, auth_required=False)
    app_resources = Resources(
        settings=config,
        auth=Authenticator(config),
        bus=InProcessBus(),
        blobs=FilesystemBlobStore(tmp_path / "blobs"),
        metadata=SqliteMetadataStore(tmp_path / "metadata.sqlite"),
        search=SqliteSearchIndex(tmp_path / "search.sqlite"),
    )
    app = create_app(app_resources, [Api(repository, notifier)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fhir.test") as api:
        yield Fhir(api, repository, notifier, outbox, numbers)
    stopping.set()
    await running
    await client.aclose()
    for part in (outbox, numbers, resources_db):
        await part.close()


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait until ``check`` holds (the worker runs beside the test)."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def status_becomes(fhir: Fhir, id: str, status: str) -> dict[str, Any]:
    """Wait until the Subscription has ``status``; its JSON then."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        resource: dict[str, Any] = (await fhir.client.get(f"/fhir/Subscription/{id}")).json()
        if resource["status"] == status:
            return resource
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"Subscription/{id} is {resource['status']}, not {status}")
        await asyncio.sleep(0.05)


# --- Publishing reports --------------------------------------------------------------------------


def facts(patient_id: str, study_uid: str) -> StudyFacts:
    ready = study_ready()
    ready.patient_id, ready.study_instance_uid = patient_id, study_uid
    return StudyFacts.from_study_ready(ready)


async def publish(
    repository: Repository, job_id: str, patient_id: str = "MRN-0042", study_uid: str = STUDY
) -> tuple[StoredResource, Envelope]:
    """Store a result's resources as the publisher does; its report and ``ReportPublished``."""
    result = completed(nodule(0.93, 21.6, 2), job_id=job_id)
    result.patient_id, result.study_instance_uid = patient_id, study_uid
    study = facts(patient_id, study_uid)
    published = publication(result, study, SETTINGS)
    resources = [*imaging_resources(study, SETTINGS), *(entry.resource for entry in published.entries)]
    writes = []
    for resource in resources:
        data = resource_json(resource)
        writes.append(ResourceWrite(data["resourceType"], data["id"], data, canonical_sha256(resource)))
    outcomes = await repository.write(writes)
    stored = [outcome.stored for outcome in outcomes]
    report = next(item for item in stored if item.resource_type == "DiagnosticReport")
    envelope = events.report_published(result, report.reference, stored, datetime.now(UTC))
    return report, envelope


async def patient_reference(repository: Repository, patient_id: str) -> str:
    """The Patient resource the publisher made for a DICOM PatientID."""
    resource = next(
        r for r in imaging_resources(facts(patient_id, STUDY), SETTINGS) if r.get_resource_type() == "Patient"
    )
    return f"Patient/{resource_json(resource)['id']}"


def subscription(endpoint: str, *filters: str, content: str = "full-resource") -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "AI results for the chest clinic",
        "criteria": TOPIC,
        "_criteria": {"extension": [{"url": FILTER_CRITERIA, "valueString": f} for f in filters]},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": content}]},
            "header": ["Authorization: Bearer receiver-token"],
        },
    }


# --- Tests ---------------------------------------------------------------------------------------


async def test_a_subscription_is_activated_by_its_handshake_and_notified_of_matching_reports(
    fhir: Fhir, receiver: Receiver
) -> None:
    patient = await patient_reference(fhir.repository, "MRN-0042")
    wanted = f"DiagnosticReport?patient={patient}&code=http://loinc.org|18748-4"
    created = await fhir.client.post(
        "/fhir/Subscription", json=subscription(f"{receiver.url}/hook", wanted), headers=FHIR_JSON
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "requested"
    id = created.json()["id"]

    # The handshake goes out and its success activates the Subscription.
    await status_becomes(fhir, id, "active")
    [shake] = receiver.of_type("handshake")
    assert shake.headers["Authorization"] == "Bearer receiver-token"
    assert shake.status["subscription"]["valueReference"]["reference"] == f"{BASE}/Subscription/{id}"
    assert shake.status["topic"]["valueCanonical"] == TOPIC
    assert shake.status["events-since-subscription-start"]["valueString"] == "0"

    # One report of the subscribed patient, one of another: only the first is notified.
    report, envelope = await publish(fhir.repository, "job-1")
    _, other = await publish(fhir.repository, "job-2", "MRN-0099", f"{STUDY}.9")
    await fhir.notifier.on_report_published(envelope)
    await fhir.notifier.on_report_published(other)
    await eventually(lambda: len(receiver.of_type("event-notification")) >= 1, "the notification")
    [notified] = receiver.of_type("event-notification")
    assert notified.body["type"] == "history"
    assert notified.status["status"]["valueCode"] == "active"
    assert notified.status["events-since-subscription-start"]["valueString"] == "1"
    parts = {part["name"]: part for part in notified.status["notification-event"]["part"]}
    assert parts["event-number"]["valueString"] == "1"
    assert parts["focus"]["valueReference"]["reference"] == f"{BASE}/{report.reference}"
    focus = notified.body["entry"][1]
    assert focus["fullUrl"] == f"{BASE}/{report.reference}"
    assert focus["resource"]["subject"]["reference"] == patient

    # A redelivered event adds nothing.
    await fhir.notifier.on_report_published(envelope)
    await asyncio.sleep(0.5)
    assert len(receiver.of_type("event-notification")) == 1
    assert await fhir.outbox.outstanding() == []

    # A receiver that fails at first gets the next one later, with the next number.
    receiver.failures = 2
    attempts = receiver.attempts
    _, third = await publish(fhir.repository, "job-3")
    await fhir.notifier.on_report_published(third)
    await eventually(lambda: len(receiver.of_type("event-notification")) == 2, "the retried notification")
    assert receiver.attempts - attempts == 3
    assert (
        receiver.of_type("event-notification")[1].status["events-since-subscription-start"]["valueString"]
        == "2"
    )

    # $status tells the same.
    answer = await fhir.client.get(f"/fhir/Subscription/{id}/$status")
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert bundle["type"] == "searchset"
    status = {p["name"]: p for p in bundle["entry"][0]["resource"]["parameter"]}
    assert status["type"]["valueCode"] == "query-status"
    assert status["status"]["valueCode"] == "active"
    assert status["events-since-subscription-start"]["valueString"] == "2"


async def test_a_failed_handshake_puts_the_subscription_in_error_until_it_is_requested_again(
    fhir: Fhir, receiver: Receiver
) -> None:
    created = await fhir.client.post(
        "/fhir/Subscription", json=subscription(f"{receiver.url}/refuse"), headers=FHIR_JSON
    )
    id = created.json()["id"]
    failed = await status_becomes(fhir, id, "error")
    assert "the handshake to" in failed["error"]
    assert "HTTP 400" in failed["error"]

    # Nothing is sent to a Subscription in error.
    _, envelope = await publish(fhir.repository, "job-1")
    await fhir.notifier.on_report_published(envelope)
    await asyncio.sleep(0.3)
    assert receiver.of_type("event-notification") == []

    # Moved to a working endpoint and requested again, it is handshaken and active.
    again = {**subscription(f"{receiver.url}/hook"), "id": id}
    updated = await fhir.client.put(f"/fhir/Subscription/{id}", json=again, headers=FHIR_JSON)
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "requested"
    assert "error" not in updated.json()
    await status_becomes(fhir, id, "active")
    assert len(receiver.of_type("handshake")) == 1


async def test_the_api_refuses_what_it_cannot_serve_with_422(fhir: Fhir, receiver: Receiver) -> None:
    body = subscription(f"{receiver.url}/hook", "DiagnosticReport?category=RAD")
    refused = await fhir.client.post("/fhir/Subscription", json=body, headers=FHIR_JSON)
    assert refused.status_code == 422
    diagnostics = refused.json()["issue"][0]["diagnostics"]
    assert "'category' cannot filter this topic; offered: patient, subject, code, status" in diagnostics
    metadata = (await fhir.client.get("/fhir/metadata")).json()
    [described] = [r for r in metadata["rest"][0]["resource"] if r["type"] == "Subscription"]
    assert described["extension"][0]["valueCanonical"] == TOPIC


@pytest.fixture(params=["sqlite", "mongodb"])
async def two_numberers(
    request: pytest.FixtureRequest, tmp_path: Path, mongodb_url: str, mongodb_database: str
) -> AsyncIterator[tuple[EventNumbers, EventNumbers]]:
    """Two handles on one set of event numbers, as two FHIR processes have."""
    made: list[EventNumbers] = []
    for _ in range(2):
        if request.param == "sqlite":
            made.append(SqliteEventNumbers(tmp_path / "subscriptions.sqlite"))
        else:
            made.append(MongoEventNumbers(mongodb_url, mongodb_database))
    for numbers in made:
        await numbers.start()
    yield made[0], made[1]
    for numbers in made:
        await numbers.close()


async def test_two_processes_number_events_once_each(
    two_numberers: tuple[EventNumbers, EventNumbers],
) -> None:
    one, two = two_numberers
    events = [f"DiagnosticReport/r{n}/_history/1" for n in range(20)]
    taken = await asyncio.gather(
        *(one.number("sub", event) for event in events[::2]),
        *(two.number("sub", event) for event in events[1::2]),
    )
    assert sorted(taken) == list(range(1, 21))
    # Asked again, by the other process, every event keeps its number.
    again = await asyncio.gather(
        *(two.number("sub", event) for event in events[::2]),
        *(one.number("sub", event) for event in events[1::2]),
    )
    assert again == taken
    assert await one.count("sub") == await two.count("sub") == 20
    assert await one.count("other") == 0
