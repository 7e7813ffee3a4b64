"""`lucerna up` turns a study sent to it into findings, with nothing else to start: the workflow
rules pick the models, the local Triton runs them, the job API and the result API show it."""

from __future__ import annotations

import asyncio
import subprocess
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom

from lucerna.inference import synthetic
from tests.e2e.platform import LucernaProcess

BOUNDARY = "lucerna-e2e"


def jobs_of(platform: LucernaProcess, study_uid: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{platform.base_url}/api/jobs", params={"study": study_uid}, timeout=10)
    response.raise_for_status()
    jobs: list[dict[str, Any]] = response.json()["jobs"]
    return jobs


async def finished_jobs(
    platform: LucernaProcess, study_uid: str, within: float = 180
) -> list[dict[str, Any]]:
    """The study's jobs once there are some and none is queued or running any more."""
    deadline = time.monotonic() + within
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        jobs = await asyncio.to_thread(jobs_of, platform, study_uid)
        if jobs and all(job["state"] not in {"queued", "running"} for job in jobs):
            return jobs
        await asyncio.sleep(0.2)
    raise AssertionError(f"jobs of {study_uid} not finished after {within}s: {jobs}\n{platform.log_tail()}")


def findings_of(platform: LucernaProcess, job_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{platform.base_url}/api/results/{job_id}", timeout=10)
    response.raise_for_status()
    findings: list[dict[str, Any]] = response.json()["result"].get("findings", [])
    return findings


async def test_a_chest_ct_sent_by_c_store_gets_nodule_findings_where_the_nodules_are(
    platform: LucernaProcess, tmp_path: Path
) -> None:
    study = synthetic.chest_study(seed=7, slices=60)
    for number, data in enumerate(study.instances):
        (tmp_path / f"{number:03}.dcm").write_bytes(data)
    sent = await asyncio.to_thread(
        subprocess.run,
        ["storescu", "-aec", platform.ae_title, "127.0.0.1", str(platform.dimse_port), "+sd", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr

    [job] = await finished_jobs(platform, study.study_uid)
    assert (job["model"], job["state"], job["priority"], job["instance_count"]) == (
        "lung-nodule-detector",
        "succeeded",
        "routine",
        60,
    )
    findings = await asyncio.to_thread(findings_of, platform, job["job_id"])
    assert findings, "the shipped detector found none of the phantom's nodules"
    slice_of = {pydicom.dcmread(BytesIO(data)).SOPInstanceUID: z for z, data in enumerate(study.instances)}
    spacing = study.phantom.spacing  # (z, y, x) mm
    hits = [
        nodule
        for finding in findings
        for nodule in study.phantom.nodules
        if _on(finding["locations"][0], slice_of, nodule.center, nodule.diameter_mm, spacing)
    ]
    assert hits, f"no finding on a true nodule: {findings} vs {study.phantom.nodules}"


def _on(
    location: dict[str, Any],
    slice_of: dict[str, int],
    centre: tuple[float, float, float],
    diameter_mm: float,
    spacing: tuple[float, float, float],
) -> bool:
    """Whether a finding's box centre lies within a nodule (its radius, at least 3 mm, each way)."""
    z = slice_of[location["sop_instance_uid"]]
    x = (location.get("x_min", 0.0) + location.get("x_max", 0.0)) / 2
    y = (location.get("y_min", 0.0) + location.get("y_max", 0.0)) / 2
    reach = max(diameter_mm / 2, 3.0)
    offsets = ((z - centre[0]) * spacing[0], (y - centre[1]) * spacing[1], (x - centre[2]) * spacing[2])
    return bool(np.hypot(*offsets[1:]) <= reach and abs(offsets[0]) <= reach + spacing[0])


async def test_a_head_ct_sent_by_stow_rs_runs_the_stat_model(platform: LucernaProcess) -> None:
    study = synthetic.head_study(seed=3, slices=24, hemorrhage=True)
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in study.instances
    )
    response = await asyncio.to_thread(
        httpx.post,
        f"{platform.dicomweb}/studies",
        content=body + f"--{BOUNDARY}--\r\n".encode(),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'},
        timeout=60,
    )
    assert response.status_code == 200, response.text

    [job] = await finished_jobs(platform, study.study_uid)
    assert (job["model"], job["state"], job["priority"]) == ("head-ct-hemorrhage", "succeeded", "stat")
    [finding] = await asyncio.to_thread(findings_of, platform, job["job_id"])
    assert finding["display"] == "Cerebral hemorrhage" and finding["probability"] >= 0.5
