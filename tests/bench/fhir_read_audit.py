"""What auditing FHIR reads costs: the same reads and searches in process, with and without the
read audit, printed side by side.

Usage: uv run python -m tests.bench.fhir_read_audit [--requests 300] [--rounds 30] [--results 20]

The app runs in this process (embedded stores) and is called through httpx's ASGI
transport, one request at a time, so that the figure is the CPU a request costs, auditing included:
the audit's worker runs on the same event loop, and each round waits until it has published every
record before its clocks stop. The main figure is CPU time per request (``time.process_time``: this
process, every thread), which other work on a shared machine disturbs less than wall time; its
inverse is what one busy process serves. Many short rounds alternate audited and not, on one app
(the audit switched off and on between rounds); the best round of each is kept. The audit trail
takes each record as a broker would and keeps a count: what the records cost after that is the
broker's and the audit service's, not the FHIR service's (and the in-process bus, with no audit
service consuming, would hold every record of the run).

- read: ``GET /fhir/Patient/p1``;
- search: ``GET /fhir/DiagnosticReport?subject=Patient/p1&_count=<results>`` (one patient's reports).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from lucerna.core.events.ports import Envelope
from lucerna.core.http import create_app
from lucerna.fhir.canonical import canonical_sha256
from lucerna.fhir.service import FhirService
from lucerna.fhir.store import ResourceWrite
from tests.unit.orchestrator.kit import embedded_resources

WARMUP = 50


class TakenTrail:
    """An audit trail that takes every record at once, as a broker does, and counts them."""

    def __init__(self) -> None:
        self.taken = 0

    async def record(self, envelope: Envelope) -> None:
        self.taken += 1

    async def close(self) -> None:
        """Nothing to close."""


def corpus(results: int) -> list[dict[str, Any]]:
    """One patient and its reports."""
    reports = [
        {
            "resourceType": "DiagnosticReport",
            "id": f"r{number}",
            "status": "final",
            "code": {"text": "CT chest"},
            "subject": {"reference": "Patient/p1"},
        }
        for number in range(results)
    ]
    return [{"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe"}]}, *reports]


async def rounds(
    url: str, *, requests: int, count: int, results: int
) -> dict[bool, list[tuple[float, float]]]:
    """(CPU µs per request, wall-clock requests/s) of each round, by audited or not; every audit
    record of a round is published before its clocks stop."""
    measured: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as folder:
        resources = embedded_resources(Path(folder))
        trail = resources.audit = TakenTrail()
        fhir = FhirService()
        app = create_app(resources, [fhir])
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://x") as client,
        ):
            repository = fhir.repository
            assert repository is not None
            await repository.write(
                [
                    ResourceWrite(r["resourceType"], r["id"], r, canonical_sha256(r), None)
                    for r in corpus(results)
                ]
            )
            auditor = fhir._auditor  # the bench switches the audit off between rounds; nothing else does
            assert auditor is not None

            async def drained() -> None:
                while not auditor.idle():  # noqa: ASYNC110 - no event to await
                    await asyncio.sleep(0.0005)

            for _ in range(WARMUP):
                await client.get(url)
            for _ in range(count):
                for audited in (False, True):
                    fhir._auditor = auditor if audited else None
                    await drained()
                    cpu, wall = time.process_time(), time.perf_counter()
                    for _ in range(requests):
                        response = await client.get(url)
                        if response.status_code != 200:
                            raise RuntimeError(f"{url} answered {response.status_code}")
                    await drained()
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    measured[audited].append((cpu / requests * 1e6, requests / wall))
            fhir._auditor = auditor  # stopped (and drained) with the app
            if trail.taken < count * requests:
                raise RuntimeError(f"only {trail.taken} audit records for {count * requests} audited reads")
    return measured


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="requests per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of each (audited, not)")
    parser.add_argument("--results", type=int, default=20)
    args = parser.parse_args()
    urls = {
        "read": "/fhir/Patient/p1",
        "search": f"/fhir/DiagnosticReport?subject=Patient/p1&_count={args.results}",
    }
    print(f"{'':8}{'not audited':>28}{'audited':>28}{'audit costs':>24}")
    print(f"{'':8}{'CPU/request  (req/CPU-s)':>28}{'CPU/request  (req/CPU-s)':>28}{'CPU/request  req/s':>24}")
    for kind, url in urls.items():
        measured = await rounds(url, requests=args.requests, count=args.rounds, results=args.results)
        plain, audited = (min(cpu for cpu, _ in measured[flag]) for flag in (False, True))
        walls = {flag: max(rate for _, rate in measured[flag]) for flag in (False, True)}
        print(
            f"{kind:8}{plain:12.0f} µs  ({1e6 / plain:6.0f}){audited:15.0f} µs  ({1e6 / audited:6.0f})"
            f"{audited - plain:11.0f} µs {1 - plain / audited:9.1%}"
            f"   (wall, best: {walls[False]:.0f} / {walls[True]:.0f} req/s)"
        )


if __name__ == "__main__":
    asyncio.run(main())
