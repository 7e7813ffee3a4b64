"""Study-level QIDO-RS on FerretDB + Elasticsearch: the search-index path (ADR 0004) beside the
metadata store's own matching (the anchor), both through ``querying.run_qido``, on the corpus of
``tests/bench/seed.py``; also the indexer's idle poll and the time until a new study is found.

Usage: uv run python -m tests.bench.qido_paths [--studies 1000] [--per-study 100] [--runs 300]
                                               [--mongodb-url URL --elasticsearch-url URL]
Without URLs it starts FerretDB and Elasticsearch (``infra/local/servers.py``) in a temporary
folder and stops them at the end; the database and the index it creates are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from elasticsearch import AsyncElasticsearch
from pymongo import AsyncMongoClient

from lucerna.core.dicom.attributes import derive
from lucerna.core.storage.elastic import ElasticSearchIndex
from lucerna.core.storage.mongo import MongoMetadataStore
from lucerna.core.storage.ports import DicomJson, Query
from lucerna.metadata.indexing import Indexer, index_changes
from lucerna.metadata.qido import QidoRequest, parse_qido
from lucerna.metadata.querying import run_qido
from tests.bench.seed import records, seed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "infra" / "local"))

import servers  # noqa: E402 - infra/local is a folder of scripts, not a package

QUERIES = {
    "PatientName=SMITH1*": [("PatientName", "SMITH1*")],
    "StudyDate=20210301-20210315": [("StudyDate", "20210301-20210315")],
}
BASE = "http://bench"


class _StoreOnly:
    """The search index as it was before ADR 0004: no structured queries."""

    def __init__(self, index: ElasticSearchIndex) -> None:
        self._index = index

    async def fuzzy_patient_names(self, name: str, limit: int = 1000) -> list[str]:
        return await self._index.fuzzy_patient_names(name, limit)

    async def query_studies(self, query: Query) -> list[DicomJson] | None:
        return None


async def _timed(call: Callable[[], Awaitable[object]], runs: int, warmup: int = 20) -> list[float]:
    samples = []
    for i in range(runs + warmup):
        started = time.perf_counter()
        await call()
        if i >= warmup:
            samples.append((time.perf_counter() - started) * 1000)
    return sorted(samples)


def _figure(samples: list[float]) -> str:
    p99 = samples[max(0, int(len(samples) * 0.99) - 1)]
    return f"p50 {statistics.median(samples):7.2f}  p99 {p99:7.2f}"


async def _lag(store: MongoMetadataStore, search: ElasticSearchIndex, tries: int) -> list[float]:
    """Seconds from storing a new study to finding it by patient name, with the indexer loop running."""
    template = next(records(1, 1))
    indexer = Indexer(store, search)
    indexer.start()
    samples = []
    try:
        for k in range(tries):
            uid = f"2.25.9{uuid.uuid4().int % 10**20}"
            name = f"LAGTEST{k}^{uuid.uuid4().hex[:6].upper()}"
            dataset = {
                **template.dataset,
                "0020000D": {"vr": "UI", "Value": [uid]},
                "0020000E": {"vr": "UI", "Value": [f"{uid}.1"]},
                "00080018": {"vr": "UI", "Value": [f"{uid}.1.1"]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
            }
            record = replace(
                template, study_uid=uid, series_uid=f"{uid}.1", sop_instance_uid=f"{uid}.1.1",
                sha256=uuid.uuid4().hex * 2, dataset=dataset, attributes=derive(dataset),
            )
            request = parse_qido("study", [("PatientName", name)])
            started = time.perf_counter()
            await store.put_instances([record])
            await store.clear_audit([record.sop_instance_uid])
            while not await run_qido(request, store, search, BASE):  # noqa: ASYNC110 - polling is the point
                await asyncio.sleep(0.005)
            samples.append(time.perf_counter() - started)
    finally:
        await indexer.stop()
    return sorted(samples)


async def measure(mongodb_url: str, elasticsearch_url: str, studies: int, per_study: int, runs: int) -> None:
    """Seed, index, and print the figures."""
    suffix = uuid.uuid4().hex[:8]
    database, index = f"qido_paths_{suffix}", f"qido-paths-{suffix}"
    store, search = MongoMetadataStore(mongodb_url, database), ElasticSearchIndex(elasticsearch_url, index)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_drop, mongodb_url, database, elasticsearch_url, index)
        await store.start()
        stack.push_async_callback(store.close)
        await search.start()
        stack.push_async_callback(search.close)

        started = time.perf_counter()
        written = await seed(store, studies, per_study)
        print(f"seeded {written} instances in {studies} studies: {time.perf_counter() - started:.1f} s")
        started, indexed = time.perf_counter(), 0
        while await store.studies_to_index(limit=1):
            indexed += await index_changes(store, search)
        print(f"indexed {indexed} studies through the outbox: {time.perf_counter() - started:.1f} s")

        print(f"\n{'study-level QIDO-RS (run_qido), ms':44} {'search index':>26} {'store (anchor)':>26}")
        store_only: Any = _StoreOnly(search)
        for label, params in QUERIES.items():
            request = parse_qido("study", params)
            found = await run_qido(request, store, search, BASE)
            anchor = await run_qido(request, store, store_only, BASE)
            assert found == anchor and found, f"{label}: the index and the store disagree"

            async def through_index(request: QidoRequest = request) -> object:
                return await run_qido(request, store, search, BASE)

            async def through_store(request: QidoRequest = request) -> object:
                return await run_qido(request, store, store_only, BASE)

            ours, theirs = await _timed(through_index, runs), await _timed(through_store, runs)
            print(f"{label + f' ({len(found)} studies)':44} {_figure(ours):>26} {_figure(theirs):>26}"
                  "   target p99 < 20")

        poll = await _timed(store.studies_to_index, runs)
        lag_read = await _timed(store.index_lag_seconds, runs)
        print(f"\n{'indexer poll, empty outbox (studies_to_index)':44} {_figure(poll):>26} ms")
        print(f"{'lag gauge read (index_lag_seconds)':44} {_figure(lag_read):>26} ms")
        lag = await _lag(store, search, tries=20)
        median = statistics.median(lag)
        print(f"{'new study found by name after put, s':44} p50 {median:7.3f}  max {lag[-1]:7.3f}")


async def _drop(mongodb_url: str, database: str, elasticsearch_url: str, index: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_url)
    await client.drop_database(database)
    await client.close()
    elastic = AsyncElasticsearch(elasticsearch_url)
    await elastic.indices.delete(index=index, ignore_unavailable=True)
    await elastic.close()


def _start_servers(stack: ExitStack) -> tuple[str, str]:
    base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lucerna-qido-paths-", dir="/tmp")))
    base.chmod(0o755)  # Elasticsearch may run as an unprivileged user
    started = []
    for make in (servers.FerretDB, servers.Elasticsearch):
        for offset in range(300, 600, 10):
            server = make(base, port_offset=offset)
            if all(servers.port_is_free(port) for port in server.ports):
                break
        server.start()
        stack.callback(server.stop)
        started.append(server)
    return started[0].url, started[1].url


def main() -> int:
    """Parse the options, start the servers if needed, measure."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--per-study", type=int, default=100)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--mongodb-url")
    parser.add_argument("--elasticsearch-url")
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.mongodb_url and args.elasticsearch_url:
            urls = (args.mongodb_url, args.elasticsearch_url)
        else:
            urls = _start_servers(stack)
        asyncio.run(measure(*urls, args.studies, args.per_study, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
