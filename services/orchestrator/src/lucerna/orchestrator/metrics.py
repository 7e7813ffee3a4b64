"""Prometheus metrics of the orchestrator (beside the shared HTTP metrics of ``lucerna.core.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

JOBS_CREATED = Counter(
    "lucerna_orchestrator_jobs_created_total", "Jobs created, by model and priority", ["model", "priority"]
)
TRANSITIONS = Counter(
    "lucerna_orchestrator_job_transitions_total",
    "Job state changes, by the state left (created for a new job) and the state entered",
    ["from_state", "to_state"],
)
REQUESTS_PUBLISHED = Counter(
    "lucerna_orchestrator_requests_published_total", "inference.requested events the bus took", ["priority"]
)
PUBLISH_FAILURES = Counter(
    "lucerna_orchestrator_publish_failures_total",
    "inference.requested events the bus refused (kept in the job outbox and published again)",
)
PUBLICATIONS_PENDING = Gauge(  # the workers sweep one shared job store: the last sweep (ADR 0021)
    "lucerna_orchestrator_publications_pending",
    "Due inference requests left unpublished by the last sweep (the bus refused them)",
    multiprocess_mode="livemostrecent",
)
DEAD_LETTERS = Counter(
    "lucerna_orchestrator_dead_letters_total", "Dead letters recorded, by the queue they died in", ["queue"]
)
