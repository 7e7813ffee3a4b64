"""Prometheus metrics of the inference worker (beside the shared ones of ``lucerna.core.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter(
    "lucerna_inference_jobs_total",
    "Jobs handled, by model and outcome (completed, already_completed, failed)",
    ["model", "outcome"],
)
FAILURES = Counter(
    "lucerna_inference_failures_total",
    "Jobs failed for good (InferenceFailed), by model and reason",
    ["model", "reason"],
)
STAGE_SECONDS = Histogram(
    "lucerna_inference_stage_seconds",
    "Time per job stage (queued, load, preprocess, inference, postprocess, total)",
    ["model", "stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
SLICES = Counter("lucerna_inference_slices_total", "Slices (frames) sent to a model", ["model"])
TRITON_LATENCY = Histogram(
    "lucerna_inference_triton_request_seconds",
    "Latency of one Triton inference request (one batch)",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TRITON_ERRORS = Counter(
    "lucerna_inference_triton_errors_total",
    "Triton requests that failed, by model and gRPC status",
    ["model", "status"],
)
# Gauges say how worker processes combine (ADR 0021): ready only while every worker sees Triton
# ready; jobs summed over the workers.
TRITON_READY = Gauge(
    "lucerna_inference_triton_ready",
    "1 while Triton answers and serves the models, else 0",
    multiprocess_mode="livemin",
)
WAITING_FOR_TRITON = Gauge(
    "lucerna_inference_jobs_waiting_for_triton",
    "Jobs held (not retried) while Triton is unavailable",
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "lucerna_inference_jobs_queued",
    "Jobs taken from the bus, waiting for a slot, by priority",
    ["priority"],
    multiprocess_mode="livesum",
)
RESULTS_REPUBLISHED = Counter(
    "lucerna_inference_results_republished_total",
    "InferenceCompleted events published again from the result store (outbox relay or a redelivered job)",
)
