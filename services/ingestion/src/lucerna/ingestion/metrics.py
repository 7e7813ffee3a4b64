"""Prometheus metrics of ingestion (beside the shared HTTP metrics of ``lucerna.core.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INSTANCES = Counter(
    "lucerna_ingestion_instances_total",
    "Instances offered for storage, by transport (stow, dimse) and outcome (stored, already_stored, failed)",
    ["transport", "outcome"],
)
BYTES = Counter("lucerna_ingestion_bytes_total", "Bytes of newly stored instances", ["transport"])
INGEST_LATENCY = Histogram(
    "lucerna_ingestion_ingest_seconds",
    "Time to ingest one batch (a STOW-RS request or one C-STORE), from bytes to stored and audited",
    ["transport"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ASSOCIATIONS = Gauge(  # each worker's open associations, summed over the workers (ADR 0021)
    "lucerna_ingestion_dimse_associations", "DIMSE associations open now", multiprocess_mode="livesum"
)
STUDIES_READY = Counter("lucerna_ingestion_studies_ready_total", "study.ready events published")
EVENT_FAILURES = Counter(
    "lucerna_ingestion_event_failures_total",
    "Events that could not be published (kept in the store's outbox and published again)",
    ["event"],
)
AUDIT_RELAYED = Counter(
    "lucerna_ingestion_audit_relayed_total",
    "Audit records of stored instances published late by the relay, from the store's audit outbox",
)
