"""STOW-RS over the HTTP app: statuses, the Store Instances Response, limits and refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from lucerna.core.audit_trail import BusAuditTrail
from lucerna.core.auth import Authenticator
from lucerna.core.events.ports import Envelope, PublishError
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.ingestion.service import IngestionService
from lucerna.ingestion.settings import IngestionSettings

BASE = "http://lucerna.test"
STUDIES = f"{BASE}/dicom-web/studies"
DICOM_JSON = "application/dicom+json"


def multipart(*parts: bytes | tuple[str, bytes], boundary: str | None = None) -> tuple[dict[str, str], bytes]:
    """Headers and body of a STOW-RS request; a part is bytes (application/dicom) or (type, bytes)."""
    boundary = boundary or uuid.uuid4().hex
    body = b""
    for part in parts:
        kind, content = part if isinstance(part, tuple) else ("application/dicom", part)
        body += f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"',
        "Accept": DICOM_JSON,
    }
    return headers, body


def client_for(resources: Resources, **settings: Any) -> httpx.AsyncClient:
    service = IngestionService(IngestionSettings(dimse_enabled=False, **settings))
    app = create_app(resources, [service])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


@pytest.fixture
async def client(resources: Resources) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(resources) as client:
        yield client


def sequence(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(body.get(tag, {}).get("Value", []))


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


async def test_all_stored_is_200_with_references_and_urls(
    client: httpx.AsyncClient, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    study, series = generate_uid(), generate_uid()
    instances = [ct(study=study, series=series, number=n) for n in (1, 2)]
    headers, body = multipart(*instances)
    response = await client.post(STUDIES, content=body, headers=headers)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    assert "warning" not in response.headers
    answer = response.json()
    assert value(answer, "00081190") == f"{STUDIES}/{study}"
    assert "00081198" not in answer
    referenced = sequence(answer, "00081199")
    assert len(referenced) == 2
    for item, data in zip(referenced, instances, strict=True):
        sop = value(item, "00081155")
        assert value(item, "00081150") == "1.2.840.10008.5.1.4.1.1.2"
        assert value(item, "00081190") == f"{STUDIES}/{study}/series/{series}/instances/{sop}"
        assert await resources.blobs.get(hashlib.sha256(data).hexdigest()) == data
    await events.settle()
    assert len(events.audit) == 2
    assert {r.actor for r in events.audit_records()} == {"stow:local@127.0.0.1"}
    # The request's end is the burst's boundary: once quiet, the study is ready.
    [ready] = await resources.metadata.claim_ready(
        datetime.now(UTC) + timedelta(hours=1),
        quiet=timedelta(seconds=2),
        max_idle=timedelta(days=1),
        lease=timedelta(seconds=30),
    )
    assert (ready.study_uid, ready.burst_instances) == (study, 2)


async def test_some_failed_is_202_with_reasons(
    client: httpx.AsyncClient, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    good = ct()
    headers, body = multipart(good, ("text/plain", b"hello"), b"\0" * 300, ct(SOPInstanceUID="1.2.3.04"))
    response = await client.post(STUDIES, content=body, headers=headers)

    assert response.status_code == 202, response.text
    answer = response.json()
    assert len(sequence(answer, "00081199")) == 1
    failed = sequence(answer, "00081198")
    assert [value(item, "00081197") for item in failed] == [0xC000, 0xC000, 0xA900]
    assert failed[0]["00081155"] == {"vr": "UI"}  # unreadable: no UID to name
    assert value(failed[2], "00081150") == "1.2.840.10008.5.1.4.1.1.2"
    warnings = response.headers.get_list("warning")
    assert len(warnings) == 3 and all(w.startswith('299 lucerna "') for w in warnings)
    assert "part 2" in warnings[0] and "text/plain" in warnings[0]
    assert "SOPInstanceUID '1.2.3.04' is not a valid UID" in warnings[2]
    assert len(stored_blobs()) == 1


async def test_none_stored_is_409(
    client: httpx.AsyncClient, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    wanted = generate_uid()
    headers, body = multipart(ct(), ct())
    response = await client.post(f"{STUDIES}/{wanted}", content=body, headers=headers)

    assert response.status_code == 409, response.text
    answer = response.json()
    assert value(answer, "00081190") == f"{STUDIES}/{wanted}"
    assert [value(item, "00081197") for item in sequence(answer, "00081198")] == [0xA900, 0xA900]
    assert "00081199" not in answer
    assert stored_blobs() == []


async def test_resending_identical_bytes_is_200_and_says_so(
    client: httpx.AsyncClient, events: Any, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    data = ct()
    headers, body = multipart(data)
    first = await client.post(STUDIES, content=body, headers=headers)
    again = await client.post(STUDIES, content=body, headers=headers)

    assert (first.status_code, again.status_code) == (200, 200)
    assert "warning" not in first.headers
    assert again.json()["00081199"] == first.json()["00081199"]
    [warning] = again.headers.get_list("warning")
    assert "1 instance(s) already stored with identical bytes" in warning
    assert len(stored_blobs()) == 1
    await events.settle()
    assert len(events.audit) == 1


async def test_same_uid_other_bytes_is_refused_per_instance(
    client: httpx.AsyncClient, resources: Resources, ct: Callable[..., bytes]
) -> None:
    sop = generate_uid()
    original, changed, other = ct(SOPInstanceUID=sop), ct(SOPInstanceUID=sop, PatientName="X^Y"), ct()
    headers, body = multipart(original)
    assert (await client.post(STUDIES, content=body, headers=headers)).status_code == 200

    headers, body = multipart(changed, other)
    response = await client.post(STUDIES, content=body, headers=headers)
    assert response.status_code == 202
    [failed] = sequence(response.json(), "00081198")
    assert (value(failed, "00081155"), value(failed, "00081197")) == (sop, 0x0111)
    record = await resources.metadata.get_instance(sop)
    assert record is not None and record.sha256 == hashlib.sha256(original).hexdigest()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(lambda full: full[: full.rindex(b"--")], id="no-closing-delimiter"),
        pytest.param(lambda full: full[: len(full) // 2], id="cut-inside-a-part"),
        pytest.param(lambda full: b"not multipart at all", id="no-delimiter"),
    ],
)
async def test_malformed_or_truncated_body_is_400_and_stores_nothing(
    client: httpx.AsyncClient,
    ct: Callable[..., bytes],
    stored_blobs: Callable[[], list[Path]],
    body: Callable[[bytes], bytes],
) -> None:
    headers, full = multipart(ct(), ct())
    response = await client.post(STUDIES, content=body(full), headers=headers)
    assert response.status_code == 400
    assert "nothing was stored" in response.json()["error"]
    assert stored_blobs() == []


async def test_a_body_without_parts_is_400(client: httpx.AsyncClient) -> None:
    headers, body = multipart()
    response = await client.post(STUDIES, content=body, headers=headers)
    assert response.status_code == 400
    assert "no instances" in response.json()["error"]


async def test_the_size_limit_is_413_by_length_and_while_streaming(
    resources: Resources, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    headers, body = multipart(ct(), ct())
    async with client_for(resources, max_stow_bytes=len(body) - 1) as client:
        declared = await client.post(STUDIES, content=body, headers=headers)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        streamed = await client.post(STUDIES, content=chunks(), headers=headers)
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert "exceeds the limit" in streamed.json()["error"]
    assert stored_blobs() == []


async def test_a_streamed_body_within_the_limit_is_stored(
    resources: Resources, ct: Callable[..., bytes]
) -> None:
    headers, body = multipart(ct(), ct(), ct())

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 777):
            yield body[start : start + 777]

    async with client_for(resources, max_stow_bytes=len(body)) as client:
        response = await client.post(STUDIES, content=chunks(), headers=headers)
    assert response.status_code == 200
    assert len(sequence(response.json(), "00081199")) == 3


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, "no Content-Type"),
        ("application/dicom", "Content-Type application/dicom is not supported"),
        ("application/json", "Content-Type application/json is not supported"),
        ('multipart/related; type="application/dicom+xml"; boundary=x', 'type="application/dicom+xml"'),
        ("multipart/related; boundary=", "unreadable Content-Type"),
    ],
)
async def test_wrong_content_type_is_415(
    client: httpx.AsyncClient, ct: Callable[..., bytes], content_type: str | None, expected: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post(STUDIES, content=ct(), headers=headers)
    assert response.status_code == 415
    assert expected in response.json()["error"]
    assert 'multipart/related; type="application/dicom"' in response.json()["error"]


async def test_missing_boundary_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        STUDIES, content=b"x", headers={"Content-Type": 'multipart/related; type="application/dicom"'}
    )
    assert response.status_code == 400
    assert "boundary" in response.json()["error"]


async def test_only_json_responses_are_offered(client: httpx.AsyncClient, ct: Callable[..., bytes]) -> None:
    headers, body = multipart(ct())
    response = await client.post(
        STUDIES, content=body, headers={**headers, "Accept": "application/dicom+xml"}
    )
    assert response.status_code == 406


async def test_an_invalid_study_uid_in_the_url_is_400(
    client: httpx.AsyncClient, ct: Callable[..., bytes]
) -> None:
    headers, body = multipart(ct())
    response = await client.post(f"{STUDIES}/not-a-uid", content=body, headers=headers)
    assert response.status_code == 400


async def test_a_part_without_content_type_is_taken_as_dicom(
    client: httpx.AsyncClient, ct: Callable[..., bytes]
) -> None:
    boundary = "plainparts"
    body = f"--{boundary}\r\n\r\n".encode() + ct() + f"\r\n--{boundary}--".encode()
    response = await client.post(
        STUDIES, content=body, headers={"Content-Type": f"multipart/related; boundary={boundary}"}
    )
    assert response.status_code == 200


async def test_retrieve_urls_use_the_public_base_url(resources: Resources, ct: Callable[..., bytes]) -> None:
    study = generate_uid()
    headers, body = multipart(ct(study=study))
    async with client_for(resources, public_base_url="https://pacs.example.org/") as client:
        response = await client.post(STUDIES, content=body, headers=headers)
    assert value(response.json(), "00081190") == f"https://pacs.example.org/dicom-web/studies/{study}"


async def test_a_token_with_write_scope_is_required_when_auth_is_on(
    tmp_path: Path, resources: Resources, ct: Callable[..., bytes]
) -> None:
    secured = Resources(
        settings=resources.settings,
        auth=Authenticator(CoreSettings(data_dir=tmp_path, auth_required=True)),
        bus=resources.bus,
        blobs=resources.blobs,
        metadata=resources.metadata,
        search=resources.search,
    )
    headers, body = multipart(ct())
    async with client_for(secured) as client:
        response = await client.post(STUDIES, content=body, headers=headers)
    assert response.status_code == 401


class DownBus:
    """The real bus behind an outage: every publish is refused."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def publish(self, envelope: Envelope) -> None:
        raise PublishError("broker unreachable")


async def test_a_bus_outage_fails_no_store(resources: Resources, ct: Callable[..., bytes]) -> None:
    study = generate_uid()
    headers, body = multipart(ct(study=study), ct(study=study))
    down = DownBus(resources.bus)
    async with client_for(dataclasses.replace(resources, bus=down, audit=BusAuditTrail(down))) as client:
        response = await client.post(STUDIES, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert "warning" not in response.headers
    pending = await resources.metadata.pending_audit(datetime.now(UTC) + timedelta(hours=1))
    assert [r.study_uid for r in pending] == [study, study]  # their audit records wait for the bus
