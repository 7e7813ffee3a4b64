"""`lucerna up` with two worker processes (docs/adr/0005): shared ports, shared store, supervision."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.platform import LucernaProcess
from tests.e2e.test_dicom_interop import qido_study
from tests.factories import write_ct_study


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[LucernaProcess]:
    process = LucernaProcess(
        tmp_path / "lucerna",
        {"LUCERNA_WORKERS": "2", "LUCERNA_INGESTION_QUIET_PERIOD_SECONDS": "0.5"},
    )
    process.start()
    try:
        process.wait_for_log(lambda entry: entry.get("msg") == "ready", count=2)
        yield process
    finally:
        process.stop()


def stow(platform: LucernaProcess, folder: Path) -> int:
    boundary = "lucerna-e2e-boundary"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    parts = [head + path.read_bytes() + b"\r\n" for path in sorted(folder.iterdir())]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    response = httpx.post(
        f"{platform.dicomweb}/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        timeout=30,
    )
    return response.status_code


def test_both_workers_serve_stow_rs_and_c_store_into_one_store(
    two_workers: LucernaProcess, tmp_path: Path
) -> None:
    folders = [tmp_path / f"study{i}" for i in range(8)]
    studies = [write_ct_study(folder, slices=3, patient=f"WORKERS^{i}") for i, folder in enumerate(folders)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda folder: stow(two_workers, folder), folders[:6])) == [200] * 6
        storescu = ["storescu", "-aec", two_workers.ae_title, "127.0.0.1", str(two_workers.dimse_port)]
        stores = [
            pool.submit(subprocess.run, [*storescu, "+sd", str(f)], capture_output=True, timeout=60)
            for f in folders[6:]
        ]
        assert [s.result().returncode for s in stores] == [0, 0]
    for study_uid in studies:
        assert qido_study(two_workers, study_uid)["00201208"]["Value"] == [3]
    two_workers.stop()
    assert two_workers.returncode == 0
    stopped = [entry.get("worker") for entry in two_workers.log_entries() if entry.get("msg") == "stopped"]
    assert sorted(stopped) == [0, 1]


def test_a_worker_that_dies_stops_the_platform_with_an_error(two_workers: LucernaProcess) -> None:
    workers = two_workers.worker_pids()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while two_workers.returncode is None:
        assert time.monotonic() < deadline, "the supervisor did not exit"
        time.sleep(0.1)
    assert two_workers.returncode != 0
    assert any("exited unexpectedly" in str(entry.get("msg")) for entry in two_workers.log_entries())
    assert two_workers.worker_pids() == []
