"""Every published result reaches the hospital's own FHIR server (a second, independent server:
HAPI FHIR), and none is lost while that server is down: the push waits in the outbox."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from lucerna.fhir.canonical import canonical_sha256
from lucerna.inference import synthetic
from tests.e2e.platform import LucernaProcess
from tests.e2e.test_fhir_results import report_for, stow


def platform_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """Push to the session's peer FHIR server, retrying at least every 2 s (a test cannot wait 5 min)."""
    peer = request.getfixturevalue("fhir_peer")
    return {
        "LUCERNA_FHIR_PUSH_URL": peer.url,
        "LUCERNA_FHIR_PUSH_TOKEN": "peer-secret-token",
        "LUCERNA_FHIR_DELIVERY_RETRY_SECONDS": "0.5",
        "LUCERNA_FHIR_DELIVERY_RETRY_MAX_SECONDS": "2",
    }


def peer_read(peer: Any, reference: str) -> httpx.Response:
    return httpx.get(f"{peer.url}/{reference}", headers={"Accept": "application/fhir+json"}, timeout=10)


async def test_a_result_published_while_the_hospital_server_is_down_arrives_once_it_is_back(
    servers_platform: LucernaProcess, fhir_peer: Any
) -> None:
    platform = servers_platform
    fhir_peer.stop()
    try:
        study = synthetic.chest_study(seed=21, slices=30, patient_id="E2E-PUSH-21")
        await asyncio.to_thread(stow, platform, study.instances)
        report = await report_for(platform, study.study_uid)
        await asyncio.sleep(3)  # several attempts meet a closed port
    finally:
        fhir_peer.start()  # empty, as a server that lost nothing of ours because it never had it

    deadline = time.monotonic() + 60
    while (
        response := await asyncio.to_thread(peer_read, fhir_peer, f"DiagnosticReport/{report.id}")
    ).status_code != 200:
        assert time.monotonic() < deadline, f"not pushed after 60 s\n{platform.log_tail()}"
        await asyncio.sleep(0.5)

    # The hospital has the same content as Lucerna serves (canonical hashes, meta aside).
    url = f"{platform.base_url}/fhir/DiagnosticReport/{report.id}"
    ours = (await asyncio.to_thread(httpx.get, url, timeout=10)).json()
    assert canonical_sha256(response.json()) == canonical_sha256(ours)
    for reference in [ref.reference for ref in report.result] + [report.subject.reference]:
        assert (await asyncio.to_thread(peer_read, fhir_peer, reference)).status_code == 200, reference

    pushes = [r for r in fhir_peer.requests() if r.get("method") == "POST"]
    assert pushes, "the peer saw no transaction"
    assert all(r.get("headers", {}).get("Authorization") == "Bearer peer-secret-token" for r in pushes)
    assert "peer-secret-token" not in platform.log_tail(2000)
