"""Prometheus metrics shared by every service; each service adds its own beside these."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BUS_DROPPED = Counter(
    "lucerna_bus_dropped_total",
    "Messages the in-process bus dropped from a full queue (oldest first)",
    ["queue"],
)
HTTP_REQUESTS = Counter(
    "lucerna_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "lucerna_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
