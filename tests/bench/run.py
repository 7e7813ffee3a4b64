"""Ingestion and search benchmarks, each figure printed beside Orthanc's measured in the same run.

Usage: uv run python -m tests.bench.run [--instances 200] [--qido-studies 1000] [--qido-per-study 100]
                                        [--configs embedded,servers] [--out results.json]
Needs `make setup` (Orthanc, DCMTK, the real servers) and ../shared/bench (synthetic CT, STOW load client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
sys.path.insert(0, str(ROOT / "infra" / "local"))

import servers  # noqa: E402 - infra/local is a folder of scripts, not a package

from tests.bench.seed import seed  # noqa: E402
from tests.e2e.platform import LucernaProcess, real_server_settings  # noqa: E402

# Orthanc runs no models: compare ingestion and search with ingestion and search alone (the
# orchestrator and the inference worker would otherwise analyse every benchmark study meanwhile).
IMAGING_STORE = ["ingestion", "metadata"]


def synth(folder: Path, instances: int) -> Path:
    """Synthetic 512x512 CT, 100 slices a study, fresh UIDs."""
    if not folder.exists():
        studies = max(1, instances // 100)
        subprocess.run(
            [
                sys.executable,
                str(SHARED_BENCH / "synth_ct.py"),
                str(folder),
                "--slices",
                str(instances // studies),
                "--studies",
                str(studies),
            ],
            check=True,
        )
    return folder


def stow(url: str, folder: Path) -> float:
    """Instances/s with 4 concurrent clients x 10 instances per request (../shared/bench/stow_load.py)."""
    result = subprocess.run(
        [
            sys.executable,
            str(SHARED_BENCH / "stow_load.py"),
            url,
            str(folder),
            "--concurrency",
            "4",
            "--per-request",
            "10",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["failed_requests"]:
        raise RuntimeError(f"STOW-RS to {url} failed: {report}")
    return float(report["instances_per_s"])


def dimse(port: int, ae_title: str, folder: Path, parallel: int = 4) -> float:
    """Instances/s with ``parallel`` storescu processes, process start included."""
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    chunks = [files[i::parallel] for i in range(parallel)]

    def send(chunk: list[str]) -> int:
        return subprocess.run(
            ["storescu", "-aec", ae_title, "127.0.0.1", str(port), *chunk],
            capture_output=True,
            check=False,
        ).returncode

    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(send, chunks))
    elapsed = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"storescu to port {port} failed: exit codes {codes}")
    return len(files) / elapsed


def latencies(url: str, params: dict[str, str], runs: int = 300) -> dict[str, float]:
    """p50/p99 in milliseconds of one QIDO-RS query over a kept-alive connection."""
    samples = []
    with httpx.Client(headers={"Accept": "application/dicom+json"}) as client:
        for i in range(runs + 20):
            started = time.perf_counter()
            response = client.get(url, params=params)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200 or not response.json():
                raise RuntimeError(f"QIDO {params} answered {response.status_code}: {response.text[:200]}")
            if i >= 20:  # warm-up excluded
                samples.append(elapsed)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 2),
    }


def server_settings(base: Path, started: list[Any]) -> dict[str, str]:
    """Start FerretDB, Elasticsearch and RabbitMQ; the LUCERNA_* settings that point at them."""
    mongo, elastic, rabbit = (
        servers.FerretDB(base / "ferretdb"),
        servers.Elasticsearch(base / "es"),
        servers.RabbitMQ(base / "rabbitmq"),
    )
    for server in (mongo, elastic, rabbit):
        server.start()
        started.append(server)
    return real_server_settings(mongo.url, elastic.url, rabbit.url, "lucerna-bench")


async def seed_store(settings: dict[str, str], data_dir: Path, studies: int, per_study: int) -> int:
    """Write the QIDO corpus through the configured metadata store."""
    from lucerna.core.bootstrap import build_resources  # noqa: PLC0415 - reads LUCERNA_* set below
    from lucerna.core.settings import CoreSettings  # noqa: PLC0415

    os.environ.update(settings | {"LUCERNA_DATA_DIR": str(data_dir)})
    resources = build_resources(CoreSettings())
    await resources.metadata.start()
    try:
        return await seed(resources.metadata, studies, per_study)
    finally:
        await resources.metadata.close()


def wait_indexed(platform: LucernaProcess, params: dict[str, str], timeout: float = 600) -> None:
    """Wait until the search index has caught up: the lag gauge reads 0 (it also reads 0 before the
    indexer's first pass) and a query served by the index finds the seeded studies."""
    deadline = time.monotonic() + timeout
    headers = {"Accept": "application/dicom+json"}
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{platform.base_url}/metrics").text
        lag = [line for line in metrics.splitlines() if line.startswith("lucerna_search_index_lag_seconds ")]
        if lag and float(lag[0].split()[1]) == 0:
            found = httpx.get(f"{platform.dicomweb}/studies", params=params, headers=headers)
            if found.status_code == 200 and found.json():
                return
        time.sleep(1)
    raise RuntimeError("search index did not catch up")


def main() -> int:
    """Run the benchmarks and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--qido-studies", type=int, default=1000)
    parser.add_argument("--qido-per-study", type=int, default=100)
    parser.add_argument("--configs", default="embedded,servers")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configs = args.configs.split(",")
    results: dict[str, Any] = {}
    started: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="lucerna-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # Elasticsearch runs as an unprivileged user and must enter its folder
        try:
            orthanc = servers.Orthanc(base / "orthanc")
            orthanc.start()
            started.append(orthanc)
            results["orthanc"] = {
                "stow_instances_per_s": stow(
                    f"{orthanc.http_url}/dicom-web/studies", synth(base / "ct-stow-orthanc", args.instances)
                ),
                "dimse_instances_per_s": dimse(
                    orthanc.dicom_port, orthanc.ae_title, synth(base / "ct-dimse-orthanc", args.instances)
                ),
            }
            print("orthanc", json.dumps(results["orthanc"]), flush=True)
            orthanc.stop()
            started.remove(orthanc)
            for config in configs:
                settings = server_settings(base / "servers", started) if config == "servers" else {}
                platform = LucernaProcess(base / f"lucerna-{config}", settings, only=IMAGING_STORE)
                platform.start()
                try:
                    results[config] = {
                        "stow_instances_per_s": stow(
                            f"{platform.dicomweb}/studies", synth(base / f"ct-stow-{config}", args.instances)
                        ),
                        "dimse_instances_per_s": dimse(
                            platform.dimse_port,
                            platform.ae_title,
                            synth(base / f"ct-dimse-{config}", args.instances),
                        ),
                    }
                finally:
                    platform.stop()
                qido_dir = base / f"qido-{config}"
                settings = settings | (
                    {"LUCERNA_MONGODB_DATABASE": "qido_bench"} if config == "servers" else {}
                )
                count = asyncio.run(seed_store(settings, qido_dir, args.qido_studies, args.qido_per_study))
                platform = LucernaProcess(qido_dir, settings, only=IMAGING_STORE)
                platform.start()
                try:
                    wait_indexed(platform, {"PatientName": "SMITH1*"})
                    url = f"{platform.dicomweb}/studies"
                    results[config]["qido_instances"] = count
                    results[config]["qido_patient_name_wildcard"] = latencies(url, {"PatientName": "SMITH1*"})
                    results[config]["qido_study_date_range"] = latencies(
                        url, {"StudyDate": "20210301-20210315"}
                    )
                finally:
                    platform.stop()
                print(config, json.dumps(results[config]), flush=True)
        finally:
            for server in reversed(started):
                server.stop()
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict[str, Any]) -> None:
    """Each figure beside the anchor's."""
    anchor = results["orthanc"]
    print(f"\n{'figure':44} {'lucerna':>12} {'orthanc':>10} {'ratio':>7}")
    for config in (c for c in results if c != "orthanc"):
        for key in ("stow_instances_per_s", "dimse_instances_per_s"):
            ours, theirs = results[config][key], anchor[key]
            print(f"{config + ' ' + key:44} {ours:12.1f} {theirs:10.1f} {ours / theirs:6.2f}x")
        for key in ("qido_patient_name_wildcard", "qido_study_date_range"):
            figure = results[config][key]
            print(
                f"{config + ' ' + key + ' p50/p99 ms':44} {figure['p50_ms']:6.1f}/{figure['p99_ms']:<5.1f}"
                f" {'target p99 < 20 ms':>18}"
            )


if __name__ == "__main__":
    sys.exit(main())
