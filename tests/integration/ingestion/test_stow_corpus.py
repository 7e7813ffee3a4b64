"""pydicom's bundled test files (big endian, implicit VR, no meta, compressed, truncated, bad VR,
SR, RT) sent by STOW-RS over HTTP: each is stored byte for byte or refused with a reason, never a 5xx."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydicom.data
from pydicom.uid import generate_uid

from tests.factories import ct_slice
from tests.integration.ingestion.conftest import RunningIngestion

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
FAILURE_REASONS = {0x0110, 0x0111, 0xA700, 0xA900, 0xC000}


def stow_request(*instances: bytes) -> tuple[dict[str, str], bytes]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in instances
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    return headers, body + f"--{boundary}--\r\n".encode()


def items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(answer.get(tag, {}).get("Value", []))


async def test_every_bundled_file_is_stored_exactly_or_refused_with_a_reason(
    ingestion: RunningIngestion,
) -> None:
    files = sorted(TEST_FILES.glob("*.dcm"))
    assert len(files) > 60
    stored, refused = [], []
    async with httpx.AsyncClient(base_url=ingestion.http_url, timeout=60) as client:
        for path in files:
            data = path.read_bytes()
            headers, body = stow_request(data)
            response = await client.post("/dicom-web/studies", content=body, headers=headers)
            assert response.status_code in (200, 409), f"{path.name}: {response.status_code} {response.text}"
            answer = response.json()
            if response.status_code == 200:
                [item] = items(answer, "00081199")
                sop = item["00081155"]["Value"][0]
                record = await ingestion.resources.metadata.get_instance(sop)
                assert record is not None, path.name
                assert await ingestion.resources.blobs.get(record.sha256) == data, f"{path.name} bytes differ"
                stored.append(path.name)
            else:
                [item] = items(answer, "00081198")
                assert item["00081197"]["Value"][0] in FAILURE_REASONS, path.name
                assert response.headers.get_list("warning"), f"{path.name}: no reason given"
                refused.append(path.name)

        # All of them again in one request: every part has its outcome, and still no 5xx.
        headers, body = stow_request(*(path.read_bytes() for path in files))
        response = await client.post("/dicom-web/studies", content=body, headers=headers)
        assert response.status_code in (200, 202, 409), response.text
        answer = response.json()
        assert len(items(answer, "00081199")) + len(items(answer, "00081198")) == len(files)
        assert len(items(answer, "00081199")) >= len(stored)  # each stored one is at least already stored

        # The service is still up and still stores.
        assert (await client.get("/healthz")).status_code == 200
        fresh = ct_slice(generate_uid(), generate_uid(), 1, size=16)
        path = Path(ingestion.resources.settings.data_dir) / "fresh.dcm"
        fresh.save_as(path, enforce_file_format=True)
        headers, body = stow_request(path.read_bytes())
        assert (await client.post("/dicom-web/studies", content=body, headers=headers)).status_code == 200

    assert len(stored) >= 30, stored
    assert {"no_meta.dcm", "ExplVR_BigEndNoMeta.dcm", "meta_missing_tsyntax.dcm", "MR_truncated.dcm"} <= set(
        refused
    )
