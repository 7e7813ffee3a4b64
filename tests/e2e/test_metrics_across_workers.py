"""`/metrics` of `lucerna up` with several worker processes counts every worker (docs/adr/0021)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.platform import LucernaProcess

REQUESTS = 40  # each on a new connection: the kernel spreads them over the workers (SO_REUSEPORT)
SCRAPES = 6


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[LucernaProcess]:
    process = LucernaProcess(tmp_path / "lucerna", {"LUCERNA_WORKERS": "2"}, only=["metadata"])
    process.start()
    try:
        process.wait_for_log(lambda entry: entry.get("msg") == "ready", count=2)
        yield process
    finally:
        process.stop()


def requests_by_route(text: str) -> dict[str, float]:
    """lucerna_http_requests_total summed over methods and statuses, by route."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lucerna_http_requests_total":
                route = sample.labels["route"]
                counts[route] = counts.get(route, 0.0) + sample.value
    return counts


def test_every_scrape_counts_the_requests_of_both_workers(two_workers: LucernaProcess) -> None:
    # Spread over both workers: a scrape answered by one worker alone would count about half.
    for index in range(REQUESTS):
        assert httpx.get(f"{two_workers.base_url}/no-such-page/{index}").status_code == 404
    assert len(two_workers.worker_pids()) == 2
    for scrape in range(SCRAPES):  # new connections too: answered by either worker
        response = httpx.get(f"{two_workers.base_url}/metrics")
        assert response.status_code == 200
        counts = requests_by_route(response.text)
        assert counts.get("unmatched") == REQUESTS
        assert counts.get("/metrics", 0.0) == scrape  # a scrape is counted once it has answered

    prefix = "metrics of the worker processes summed from "
    directory = next(
        Path(str(entry["msg"]).removeprefix(prefix))
        for entry in two_workers.log_entries()
        if str(entry.get("msg", "")).startswith(prefix)
    )
    assert directory.stat().st_mode & 0o777 == 0o700
    two_workers.stop()
    assert two_workers.returncode == 0
    assert not directory.exists()
