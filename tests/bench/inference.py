"""Inference benchmarks: Triton throughput against onnxruntime called directly, and time to result.

Usage: uv run python -m tests.bench.inference [--parts triton,ttr] [--slices 100] [--runs 5]
                                               [--quiet-period 1.0] [--out results.json]

- ``triton``: 100 slices of a synthetic chest CT through the local Triton (PyTriton, onnxruntime in
  its Python backend) in several ways (batches of 16, one slice per request with the dynamic
  batcher merging them, one slice at a time, inputs in system shared memory), each beside
  onnxruntime called directly on the same model and inputs in this process.
- ``ttr``: time to result in the real-server configuration (FerretDB, Elasticsearch, RabbitMQ,
  `lucerna up` with its local Triton): from the last STOW-RS response of a 100-slice synthetic chest
  CT to its ``inference.completed`` event, observed on RabbitMQ, and to its DiagnosticReport
  readable at ``/fhir``; the study-assembly quiet period is part of both and printed beside them.
Needs `make setup` (the real servers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import onnxruntime as ort
import tritonclient.grpc.aio as grpc_aio

from lucerna.core.events import codec
from lucerna.core.events.ports import Envelope
from lucerna.core.events.topology import EXCHANGE, INFERENCE_COMPLETED
from lucerna.core.model_manifest import Manifest, load_repository, weights_path
from lucerna.events.v1 import events_pb2
from lucerna.fhir.publishing import resource_id
from lucerna.inference import local_triton, synthetic
from lucerna.inference.pixels import decode
from lucerna.inference.preprocess import Prepared, prepare, slices_of
from lucerna.inference.triton import TritonClient
from tests.bench.run import server_settings
from tests.e2e.platform import LucernaProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "infra" / "triton" / "models"
BOUNDARY = "lucerna-bench"


def prepared_study(manifest: Manifest, slices: int, seed: int = 11) -> Prepared:
    """A synthetic chest CT, decoded and preprocessed for ``manifest`` as the worker does."""
    study = synthetic.chest_study(seed, slices)
    return prepare(slices_of([decode(data) for data in study.instances]), manifest)


def best_of(runs: int, once: Callable[[], float]) -> float:
    """The fastest of ``runs`` timings (seconds): the least disturbed by the rest of the machine."""
    return min(once() for _ in range(runs))


def direct_seconds(manifest: Manifest, inputs: Prepared, batch: int, runs: int) -> float:
    """onnxruntime in this process, 2 threads (the machine's cores), batches of ``batch``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(weights_path(REPOSITORY, manifest)), options)
    name = manifest.inputs[0].name

    def once() -> float:
        started = time.perf_counter()
        for start in range(0, len(inputs), batch):
            session.run(None, {name: inputs.batch(start, min(start + batch, len(inputs)))})
        return time.perf_counter() - started

    once()  # warm-up
    return best_of(runs, once)


async def triton_seconds(
    url: str,
    manifest: Manifest,
    inputs: Prepared,
    batch: int,
    in_flight: int,
    runs: int,
    token: str | None = None,
) -> float:
    """The worker's Triton client: requests of ``batch`` slices, ``in_flight`` at once."""
    client = TritonClient(url, concurrency=in_flight, batch_size=batch, shared_memory_token=token)
    try:
        await client.infer(manifest, inputs)  # warm-up
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            await client.infer(manifest, inputs)
            timings.append(time.perf_counter() - started)
        return min(timings)
    finally:
        await client.close()


ACCESS_TOKEN = secrets.token_urlsafe(24)  # of the local Triton's shared-memory protocol


async def wait_ready(url: str, models: list[str], within: float = 120.0) -> None:
    """Wait until Triton serves every model."""
    client = grpc_aio.InferenceServerClient(url)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            try:
                if all([await client.is_model_ready(m) for m in models]):
                    return
            except Exception:
                pass
            await asyncio.sleep(0.5)
    finally:
        await client.close()
    raise RuntimeError(f"Triton at {url} did not serve {models} within {within}s")


def bench_triton(slices: int, runs: int, base: Path) -> dict[str, Any]:
    """Slices/s through Triton in several ways, beside onnxruntime called directly."""
    manifests = load_repository(REPOSITORY)
    grpc_port = free_port()
    url = f"127.0.0.1:{grpc_port}"
    models = ["lung-nodule-detector", "lung-nodule-detector-int8"]
    line = local_triton.command(
        REPOSITORY, grpc_port=grpc_port, http_port=free_port(), metrics_port=free_port(), models=models
    )
    log = (base / "triton.log").open("wb")
    environment = (local_triton.library_path_environment() or dict(os.environ)) | {
        local_triton.ACCESS_TOKEN_VARIABLE: ACCESS_TOKEN
    }
    server = subprocess.Popen(line, stdout=log, stderr=log, env=environment)
    results: dict[str, Any] = {"slices": slices}
    try:
        asyncio.run(wait_ready(url, models))
        for name in models:
            manifest = manifests[name]
            inputs = prepared_study(manifest, slices)
            figures = {
                "onnxruntime_direct_batch16": direct_seconds(manifest, inputs, 16, runs),
                "triton_batch16_4_in_flight": asyncio.run(triton_seconds(url, manifest, inputs, 16, 4, runs)),
                "triton_1_per_request_16_in_flight_dynamic_batching": asyncio.run(
                    triton_seconds(url, manifest, inputs, 1, 16, runs)
                ),
                "triton_1_per_request_1_in_flight": asyncio.run(
                    triton_seconds(url, manifest, inputs, 1, 1, runs)
                ),
                "triton_batch16_4_in_flight_shared_memory": asyncio.run(
                    triton_seconds(url, manifest, inputs, 16, 4, runs, ACCESS_TOKEN)
                ),
            }
            direct = figures["onnxruntime_direct_batch16"]
            results[name] = {
                way: {
                    "seconds": round(seconds, 3),
                    "slices_per_s": round(slices / seconds, 1),
                    "overhead_vs_direct_pct": round(100 * (seconds - direct) / direct, 1),
                }
                for way, seconds in figures.items()
            }
            print(name, json.dumps(results[name]), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return results


async def stow_study(dicomweb: str, instances: list[bytes], per_request: int = 10, clients: int = 4) -> float:
    """Send a study by STOW-RS as a PACS would (requests of 10, 4 at once); the monotonic time at
    which the last response came back."""
    requests = [instances[i : i + per_request] for i in range(0, len(instances), per_request)]
    slots = asyncio.Semaphore(clients)
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}

    async def send(client: httpx.AsyncClient, part: list[bytes]) -> None:
        body = (
            b"".join(
                f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                for data in part
            )
            + f"--{BOUNDARY}--\r\n".encode()
        )
        async with slots:
            response = await client.post(f"{dicomweb}/studies", content=body, headers=headers)
        response.raise_for_status()

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(send(client, part) for part in requests))
    return time.monotonic()


async def time_to_result(
    platform: LucernaProcess, rabbitmq_url: str, slices: int, runs: int
) -> dict[str, Any]:
    """From the last STOW-RS response to ``inference.completed``, per study; the first is a warm-up."""
    connection = await aio_pika.connect_robust(rabbitmq_url)
    completed: dict[str, tuple[float, events_pb2.InferenceCompleted]] = {}
    arrived = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            envelope = Envelope(
                routing_key=message.routing_key or "",
                body=message.body,
                message_id=message.message_id or "",
                correlation_id=message.correlation_id or "",
                timestamp=message.timestamp or time.time(),  # type: ignore[arg-type]
                type=message.type or "",
            )
            event = codec.decode(envelope, events_pb2.InferenceCompleted)
            completed.setdefault(event.study_instance_uid, (time.monotonic(), event))
            arrived.set()

    runs_out: list[dict[str, Any]] = []
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EXCHANGE)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, INFERENCE_COMPLETED)
        await queue.consume(on_message)
        for run in range(runs + 1):
            study = synthetic.chest_study(1000 + run, slices)
            last_response = await stow_study(platform.dicomweb, study.instances)
            deadline = time.monotonic() + 120
            while study.study_uid not in completed:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), max(0.1, deadline - time.monotonic()))
            done, event = completed[study.study_uid]
            readable = await report_readable(platform, event.job_id, deadline)
            figures = {
                "seconds": round(done - last_response, 3),
                "report_seconds": round(readable - last_response, 3),
                "findings": len(event.findings),
                "worker_ms": {
                    "queued": round(event.timings.queued_ms, 1),
                    "load": round(event.timings.load_ms, 1),
                    "preprocess": round(event.timings.preprocess_ms, 1),
                    "inference": round(event.timings.inference_ms, 1),
                    "postprocess": round(event.timings.postprocess_ms, 1),
                    "total": round(event.timings.total_ms, 1),
                },
            }
            print("warm-up" if run == 0 else f"run {run}", json.dumps(figures), flush=True)
            if run:
                runs_out.append(figures)
    finally:
        await connection.close()
    seconds = sorted(r["seconds"] for r in runs_out)
    reports = sorted(r["report_seconds"] for r in runs_out)
    return {
        "runs": runs_out,
        "median_s": statistics.median(seconds),
        "max_s": seconds[-1],
        "report_median_s": statistics.median(reports),
        "report_max_s": reports[-1],
    }


async def report_readable(platform: LucernaProcess, job_id: str, deadline: float) -> float:
    """When the job's DiagnosticReport (its id follows from the job id) answers 200 at /fhir."""
    url = f"{platform.base_url}/fhir/DiagnosticReport/{resource_id('DiagnosticReport', job_id)}"
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            if (await client.get(url)).status_code == 200:
                return time.monotonic()
            await asyncio.sleep(0.02)
    raise TimeoutError(f"{url} not readable in time")


def bench_time_to_result(slices: int, runs: int, quiet_period: float, base: Path) -> dict[str, Any]:
    """Time to result on the real servers with `lucerna up`."""
    started: list[Any] = []
    try:
        settings = server_settings(base / "servers", started)
        settings |= {
            "LUCERNA_INGESTION_QUIET_PERIOD_SECONDS": str(quiet_period),
            "LUCERNA_INGESTION_ASSEMBLY_INTERVAL_SECONDS": "0.1",
        }
        platform = LucernaProcess(base / "lucerna", settings)
        platform.start(timeout=180)
        try:
            result = asyncio.run(time_to_result(platform, settings["LUCERNA_RABBITMQ_URL"], slices, runs))
        finally:
            platform.stop()
    finally:
        for server in reversed(started):
            server.stop()
    return {"quiet_period_s": quiet_period, "slices": slices, **result}


def main() -> int:
    """Run the chosen parts and print their figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="triton,ttr")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quiet-period", type=float, default=1.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lucerna-bench-inference-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # Elasticsearch runs as an unprivileged user and must enter its folder
        parts: dict[str, Callable[[], Awaitable[Any] | Any]] = {
            "triton": lambda: bench_triton(args.slices, args.runs, base),
            "ttr": lambda: bench_time_to_result(args.slices, args.runs, args.quiet_period, base),
        }
        for part in args.parts.split(","):
            results[part] = parts[part]()
            print(part, json.dumps(results[part]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
