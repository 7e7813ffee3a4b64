"""FHIR API benchmark: reads and searches with 100,000 DiagnosticReports (and their Observations)
stored in the real-server configuration (FerretDB + Elasticsearch), beside HAPI FHIR's reads
measured on this machine in the same run (the peer server of the tests: HAPI's plain server, in
memory, so a generous anchor) and HAPI's published JPA figures.

Usage: uv run python -m tests.bench.fhir [--reports 100000] [--patients 10000] [--seconds 20]
                                          [--concurrency 4,16] [--workers 2] [--out results.json]

- reads: ``GET /fhir/DiagnosticReport/<id>`` of random reports;
- searches: ``GET /fhir/DiagnosticReport?patient=<random>&code=http://loinc.org|18748-4&date=ge<d>``
  (a patient has ~10 reports over two years; the date keeps about half).
The corpus is loaded straight into the store and the index (``ResourceStore.load``), as a
migration would, not through publishing; each report has two Observations and its Patient.
Load comes from wrk (Debian's ``wrk``, one thread) with keep-alive connections; every figure is
measured with the same client. Needs `make setup` (FerretDB, Elasticsearch, the FHIR peer, wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from lucerna.fhir.publishing import publication, resource_id, resource_json
from lucerna.fhir.repository import entries
from lucerna.fhir.store import ResourceIndex, ResourceStore, StoredResource
from tests.bench.run import ROOT
from tests.e2e.platform import LucernaProcess, real_server_settings
from tests.unit.fhir.kit import SETTINGS, study_facts, two_nodules

sys.path.insert(0, str(ROOT / "infra" / "local"))

import servers

CODE = "http://loinc.org|18748-4"
START = datetime(2024, 1, 1, tzinfo=UTC)
SPAN_MINUTES = 2 * 365 * 24 * 60
BATCH = 2000
P99_TARGET_MS = 50  # beside 800 reads/s and 300 searches/s
HAPI_PUBLISHED = "HAPI FHIR JPA, published: ~3,000 CRUD/s and ~1,000 searches/s on 8 vCPU"


class Corpus:
    """Reports, Observations and Patients made from one real publication by changing ids,
    subjects and dates (building each through the models would take longer than the benchmark)."""

    def __init__(self, reports: int, patients: int, seed: int = 5) -> None:
        published = publication(two_nodules(), study_facts(), SETTINGS)
        # What the reports refer to besides their patients (one study, the algorithm, the endpoint).
        self.context = [
            resource_json(resource)
            for resource in (
                published.endpoint,
                published.patient,
                published.imaging_study,
                published.model_device,
                published.platform_device,
            )
        ]
        self.report = resource_json(published.report)
        self.observations = [resource_json(o) for o in published.observations]
        self.patient = resource_json(published.patient)
        self.reports = reports
        self.patients = patients
        self.random = random.Random(seed)
        self.patient_ids = [resource_id("Patient", "bench", str(n)) for n in range(patients)]
        self.report_ids = [resource_id("DiagnosticReport", "bench", str(n)) for n in range(reports)]

    def batches(self) -> Iterator[list[StoredResource]]:
        """Everything to load, ``BATCH`` resources at a time."""
        batch: list[StoredResource] = []
        batch.extend(_stored(resource) for resource in self.context)
        for number, patient_id in enumerate(self.patient_ids):
            patient = copy.deepcopy(self.patient)
            patient["id"] = patient_id
            patient["identifier"][0]["value"] = f"BENCH{number:06d}"
            batch.append(_stored(patient))
        for number in range(self.reports):
            batch.extend(self._report(number))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _report(self, number: int) -> list[StoredResource]:
        subject = {"reference": f"Patient/{self.patient_ids[number % self.patients]}"}
        when = (
            (START + timedelta(minutes=self.random.randrange(SPAN_MINUTES)))
            .isoformat()
            .replace("+00:00", "Z")
        )
        made: list[dict[str, Any]] = []
        for index, template in enumerate(self.observations, start=1):
            observation = copy.deepcopy(template)
            observation["id"] = resource_id("Observation", "bench", str(number), str(index))
            observation["subject"], observation["effectiveDateTime"], observation["issued"] = (
                subject,
                when,
                when,
            )
            made.append(observation)
        report = copy.deepcopy(self.report)
        report["id"] = self.report_ids[number]
        report["subject"], report["effectiveDateTime"], report["issued"] = subject, when, when
        report["result"] = [{"reference": f"Observation/{o['id']}"} for o in made]
        report["identifier"] = [{"system": "urn:lucerna:job", "value": f"bench-{number}"}]
        return [_stored(resource) for resource in (*made, report)]


def _stored(resource: dict[str, Any]) -> StoredResource:
    at = datetime.now(UTC)
    body = {**resource, "meta": {**resource.get("meta", {}), "versionId": "1", "lastUpdated": _instant(at)}}
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    # The content hash of the bytes (publishing hashes the canonical form; nothing here verifies it).
    digest = hashlib.sha256(json.dumps(resource, sort_keys=True).encode()).hexdigest()
    return StoredResource(resource["resourceType"], resource["id"], 1, at, digest, data)


def _instant(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def load(corpus: Corpus, store: ResourceStore, index: ResourceIndex) -> tuple[int, float]:
    """Load the corpus into the store and the index; resources loaded and seconds taken."""
    started, loaded = time.perf_counter(), 0
    for batch in corpus.batches():
        await store.load(batch)
        await index.index([(stored, entries(stored)) for stored in batch])
        loaded += len(batch)
        if loaded % (BATCH * 25) < len(batch):
            print(f"  loaded {loaded} resources ({time.perf_counter() - started:.0f} s)", flush=True)
    return loaded, time.perf_counter() - started


WRK_SCRIPT = """
local paths = {}
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  math.randomseed(tonumber(args[2]))
end
request = function()
  return wrk.format("GET", paths[math.random(#paths)], {["Accept"] = "application/fhir+json"})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.3f %.3f %d\\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def hammer(
    base_url: str, paths: list[str], seconds: float, concurrency: int, folder: Path
) -> dict[str, float]:
    """GET random ``paths`` from ``concurrency`` connections for ``seconds`` with wrk (one thread,
    so the server keeps the other core): requests/s, p50 and p99 (ms), errors (non-2xx included)."""
    script, listing = folder / "paths.lua", folder / f"paths-{abs(hash(paths[0]))}.txt"
    script.write_text(WRK_SCRIPT)
    listing.write_text("\n".join(paths) + "\n")
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), base_url]
    output = subprocess.run(
        [*command, "--", str(listing), "7"], capture_output=True, text=True, check=True
    ).stdout
    [line] = [line for line in output.splitlines() if line.startswith("RESULT ")]
    requests, microseconds, p50, p99, errors = line.split()[1:]
    return {
        "per_s": round(int(requests) / (int(microseconds) / 1e6), 1),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "requests": int(requests),
        "errors": int(errors),
    }


async def load_peer(peer: Any, corpus: Corpus, reports: int) -> list[str]:
    """Put ``reports`` of the corpus's reports (with their Observations and Patients) on the peer."""
    ids: list[str] = []
    async with httpx.AsyncClient(timeout=120) as client:
        patients = [
            {"resourceType": "Patient", "id": patient_id, "active": True} for patient_id in corpus.patient_ids
        ]
        await _transaction(client, peer.url, corpus.context + patients)
        for start in range(0, reports, 300):
            resources = []
            for number in range(start, min(start + 300, reports)):
                made = [json.loads(stored.body or b"{}") for stored in corpus._report(number)]
                resources.extend({k: v for k, v in r.items() if k != "meta"} for r in made)
                ids.append(made[-1]["id"])
            await _transaction(client, peer.url, resources)
    return ids


async def _transaction(client: httpx.AsyncClient, base: str, resources: list[dict[str, Any]]) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }
    response = await client.post(base, json=bundle, headers={"Content-Type": "application/fhir+json"})
    response.raise_for_status()


async def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Start the servers, load, measure Lucerna and the HAPI peer; the figures."""
    from lucerna.fhir.elastic_index import ElasticResourceIndex  # noqa: PLC0415 - needs the servers
    from lucerna.fhir.mongo_store import MongoResourceStore  # noqa: PLC0415

    started: list[Any] = []
    try:
        mongo, elastic, peer = (
            servers.FerretDB(base / "ferretdb"),
            servers.Elasticsearch(base / "es"),
            servers.FhirPeer(base / "peer", tuned_for_speed=True),
        )
        for server in (mongo, elastic, peer):
            server.start()
            started.append(server)
        database, index_name = "lucerna_bench_fhir", "lucerna-bench-fhir"
        corpus = Corpus(args.reports, args.patients)
        store, index = MongoResourceStore(mongo.url, database), ElasticResourceIndex(elastic.url, index_name)
        await store.start()
        await index.start()
        try:
            loaded, seconds = await load(corpus, store, index)
        finally:
            await store.close()
            await index.close()
        results: dict[str, Any] = {
            "corpus": {"resources": loaded, "reports": args.reports, "load_s": round(seconds)}
        }
        print("corpus", json.dumps(results["corpus"]), flush=True)

        settings = real_server_settings(mongo.url, elastic.url, "amqp://unused", database)
        settings |= {
            "LUCERNA_BUS_BACKEND": "inprocess",
            "LUCERNA_ELASTICSEARCH_INDEX": "lucerna-bench",  # the FHIR index is <this>-fhir
            "LUCERNA_WORKERS": str(args.workers),
        }
        platform = LucernaProcess(base / "lucerna", settings, serve="fhir")
        platform.start(timeout=120)
        chooser = random.Random(3)
        cutoff = (START + timedelta(days=365)).date().isoformat()
        query = f"code={quote(CODE, safe='')}&date=ge{cutoff}"
        workloads = {
            "reads": [f"/fhir/DiagnosticReport/{chooser.choice(corpus.report_ids)}" for _ in range(20_000)],
            "searches": [
                f"/fhir/DiagnosticReport?patient={chooser.choice(corpus.patient_ids)}&{query}"
                for _ in range(20_000)
            ],
        }
        try:
            for concurrency in args.concurrency:
                for name, paths in workloads.items():
                    figures = hammer(f"{platform.base_url}/fhir", paths, args.seconds, concurrency, base)
                    results[f"lucerna_{name}_c{concurrency}"] = figures
                    print(f"lucerna {name}, {concurrency} connections", json.dumps(figures), flush=True)
        finally:
            platform.stop()

        peer_ids = await load_peer(peer, corpus, min(args.reports, args.peer_reports))
        chooser = random.Random(4)
        peer_reads = [f"/fhir/DiagnosticReport/{chooser.choice(peer_ids)}" for _ in range(20_000)]
        hammer(peer.url, peer_reads, args.seconds, max(args.concurrency), base)  # the JIT's warm-up
        for concurrency in args.concurrency:
            figures = hammer(peer.url, peer_reads, args.seconds, concurrency, base)
            results[f"hapi_peer_reads_c{concurrency}"] = figures | {"reports": len(peer_ids)}
            print(f"hapi peer reads, {concurrency} connections", json.dumps(figures), flush=True)
        return results
    finally:
        for server in reversed(started):
            server.stop()


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reports", type=int, default=100_000)
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--peer-reports", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=lambda text: [int(n) for n in text.split(",")], default=[4, 16])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lucerna-bench-fhir-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # Elasticsearch runs as an unprivileged user and must enter its folder
        results = asyncio.run(run(args, base))
    corpus = results["corpus"]
    p99 = f"p99 < {P99_TARGET_MS} ms"
    print()
    sizes = f"{corpus['reports']:,} reports, {corpus['resources']:,} resources"
    print(f"| {sizes} | per s | p50 ms | p99 ms | target |")
    print("|---|---|---|---|---|")
    for c in args.concurrency:
        print(_row(f"Lucerna reads, {c} connections", results[f"lucerna_reads_c{c}"], f"≥ 800/s, {p99}"))
        searches = results[f"lucerna_searches_c{c}"]
        print(_row(f"Lucerna searches (patient + code + date), {c} connections", searches, f"≥ 300/s, {p99}"))
    for c in args.concurrency:
        peer = results[f"hapi_peer_reads_c{c}"]
        name = f"HAPI FHIR plain server, in memory, reads ({peer['reports']:,} reports), {c} connections"
        print(_row(name, peer, "anchor, same run"))
    print(f"| {HAPI_PUBLISHED} | | | | anchor |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def _row(name: str, figures: dict[str, float], target: str) -> str:
    return f"| {name} | {figures['per_s']} | {figures['p50_ms']} | {figures['p99_ms']} | {target} |"


if __name__ == "__main__":
    raise SystemExit(main())
