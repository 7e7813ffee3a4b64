"""`lucerna up` as `make up` runs it, with its local Fabric ledger (LUCERNA_AUDIT_LOCAL_LEDGER): an
auditor verifies a study's report online down to the Fabric transaction and block, read back from
the ledger; after a restart on the same data dir the ledger is resumed, and still holds them."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import servers  # infra/local/servers.py, on the path tests/conftest.py sets up

from lucerna.inference import synthetic
from tests.e2e.platform import LucernaProcess
from tests.e2e.test_fhir_results import report_for, stow

LEDGER_PORTS = 11  # the Fabric network's ten, then the anchor service's
ANCHORED = re.compile(
    r"anchored on Fabric, channel lucerna, chaincode anchors: transaction (\w+) in block (\d+)"
)


def free_ledger_ports() -> int:
    """The first of a block of free loopback ports above the test fixtures' (Fabric: 17050 + 10k,
    the anchor service: 18095 + 10k, Triton: 18800 + 10k), so the session's network never clashes."""
    for first in range(19100, 19900, 20):
        if all(servers.port_is_free(port) for port in range(first, first + LEDGER_PORTS)):
            return first
    raise AssertionError("no free block of 11 ports for the local ledger in 19100-19900")


def verify_online(platform: LucernaProcess, report_id: str, keys: Path, within: float = 90) -> str:
    """`lucerna verify <report>`'s output once the report's entries are under an anchored checkpoint."""
    command = [sys.executable, "-m", "lucerna.core.cli", "verify", report_id, "--keys", str(keys)]
    command += ["--base-url", platform.base_url]
    deadline = time.monotonic() + within
    while True:
        run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if run.returncode == 0:
            return run.stdout
        assert "not under an anchored checkpoint yet" in run.stderr, run.stderr + platform.log_tail()
        assert time.monotonic() < deadline, run.stderr + platform.log_tail()
        time.sleep(0.5)


async def test_make_up_anchors_on_its_local_ledger_and_keeps_it_across_a_restart(tmp_path: Path) -> None:
    first_port = free_ledger_ports()
    settings = {
        "LUCERNA_AUDIT_LOCAL_LEDGER": "true",
        "LUCERNA_AUDIT_LOCAL_LEDGER_PORT": str(first_port),
        "LUCERNA_INGESTION_QUIET_PERIOD_SECONDS": "0.5",
    }
    data_dir = tmp_path / "lucerna"
    platform = LucernaProcess(data_dir, settings)
    platform.start(timeout=180)
    try:
        study = synthetic.chest_study(seed=13, slices=40, patient_id="E2E-LEDGER-13")
        await asyncio.to_thread(stow, platform, study.instances)
        report = await report_for(platform, study.study_uid)
        assert report.id is not None
        keys = tmp_path / "pinned-keys.json"
        published = await asyncio.to_thread(httpx.get, f"{platform.base_url}/.well-known/lucerna-audit-keys")
        keys.write_text(json.dumps(published.json()))
        online = await asyncio.to_thread(verify_online, platform, report.id, keys)
        assert f"verified: DiagnosticReport/{report.id}" in online
        anchored = ANCHORED.search(online)
        assert anchored is not None, online
        assert int(anchored.group(2)) > 0
        assert "the anchor read back from the ledger matches" in online, online
        assert "Fabric anchor: none" not in online
    finally:
        await asyncio.to_thread(platform.stop)
    ledger_log = (data_dir / "audit-companion.log").read_text()
    assert "building the Fabric network" in ledger_log and "ledger: stopped" in ledger_log, ledger_log
    assert all(servers.port_is_free(port) for port in range(first_port, first_port + LEDGER_PORTS))

    # The same data dir again (the FHIR resources and the log, no inference): the ledger is resumed,
    # not rebuilt, and the transaction read back from it is the one recorded before.
    again = LucernaProcess(data_dir, settings, only=["audit", "fhir"])
    again.start(timeout=120)
    try:
        online = await asyncio.to_thread(verify_online, again, str(report.id), keys)
        assert "the anchor read back from the ledger matches" in online, online
        after = ANCHORED.search(online)
        assert after is not None and after.groups() == anchored.groups(), online
    finally:
        await asyncio.to_thread(again.stop)
    assert "resuming the Fabric network" in (data_dir / "audit-companion.log").read_text()
