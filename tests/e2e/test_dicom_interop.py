"""A hospital's DICOM tools against `lucerna up`: DCMTK over DIMSE, Orthanc forwarding, DICOMweb."""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.e2e.platform import LucernaProcess
from tests.factories import write_ct_study

DICOM_JSON = {"Accept": "application/dicom+json"}


def qido_study(platform: LucernaProcess, study_uid: str, timeout: float = 10.0) -> dict[str, Any]:
    """The study's QIDO-RS entry, waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(
            f"{platform.dicomweb}/studies", params={"StudyInstanceUID": study_uid}, headers=DICOM_JSON
        )
        assert response.status_code in (200, 204), response.text
        found = response.json() if response.status_code == 200 and response.content else []
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"study {study_uid} not found by QIDO-RS"
            return dict(found[0])
        time.sleep(0.2)


def multipart_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related response."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    chunks = response.content.split(b"--" + boundary.encode())
    return [chunk.split(b"\r\n\r\n", 1)[1][:-2] for chunk in chunks if b"\r\n\r\n" in chunk]


def test_echoscu_gets_a_c_echo(platform: LucernaProcess) -> None:
    result = subprocess.run(
        ["echoscu", "-aec", platform.ae_title, "127.0.0.1", str(platform.dimse_port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_storescu_study_is_found_and_retrieved(platform: LucernaProcess, tmp_path: Path) -> None:
    study_uid = write_ct_study(tmp_path / "study", slices=3, patient="STORESCU^ALICE")
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "MODALITY1",
            "-aec",
            platform.ae_title,
            "127.0.0.1",
            str(platform.dimse_port),
            "+sd",
            str(tmp_path / "study"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    study = qido_study(platform, study_uid)
    assert study["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances
    assert study["00100010"]["Value"][0]["Alphabetic"] == "STORESCU^ALICE"
    assert study["00080061"]["Value"] == ["CT"]

    response = httpx.get(
        f"{platform.dicomweb}/studies/{study_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/related")
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in (tmp_path / "study").iterdir()}
    received = [pydicom.dcmread(io.BytesIO(part)) for part in multipart_parts(response)]
    assert sorted(ds.SOPInstanceUID for ds in received) == sorted(sent)
    for ds in received:
        assert ds.PixelData == sent[ds.SOPInstanceUID].PixelData


def test_orthanc_forwards_a_study_over_c_store(
    platform: LucernaProcess, orthanc: Any, tmp_path: Path
) -> None:
    study_uid = write_ct_study(tmp_path / "study", slices=2, patient="ORTHANC^BOB")
    api = orthanc.http_url
    for path in sorted((tmp_path / "study").iterdir()):
        assert httpx.post(f"{api}/instances", content=path.read_bytes()).status_code == 200
    modality = {"AET": platform.ae_title, "Host": "127.0.0.1", "Port": platform.dimse_port}
    assert httpx.put(f"{api}/modalities/lucerna", json=modality).status_code == 200
    orthanc_study = httpx.post(f"{api}/tools/lookup", content=study_uid).json()[0]["ID"]
    sent = httpx.post(f"{api}/modalities/lucerna/store", content=orthanc_study, timeout=60)
    assert sent.status_code == 200, sent.text

    study = qido_study(platform, study_uid)
    assert study["00201208"]["Value"] == [2]
    assert study["00100010"]["Value"][0]["Alphabetic"] == "ORTHANC^BOB"


@pytest.mark.parametrize("content_type", ["application/dicom", "text/plain"])
def test_stow_rejects_a_body_that_is_not_multipart(platform: LucernaProcess, content_type: str) -> None:
    response = httpx.post(
        f"{platform.dicomweb}/studies", content=b"not multipart", headers={"Content-Type": content_type}
    )
    assert response.status_code == 415
