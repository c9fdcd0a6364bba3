"""The Prometheus metrics every replica exports (served by :mod:`worker.health`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("notifications_messages_total", "Deliveries processed, by outcome", ["outcome"])
RETRIES = Counter(
    "notifications_retries_total", "Retries scheduled, by the attempt that failed", ["attempt"]
)
DEAD_LETTERS = Counter(
    "notifications_dead_letters_total", "Messages ended as dead letters, by reason", ["reason"]
)
DELIVERY_LATENCY = Histogram(
    "notifications_delivery_latency_seconds",
    "From occurred_at to the provider's acceptance",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
)
PROVIDER_LATENCY = Histogram(
    "notifications_provider_request_seconds",
    "Provider request duration, by status class (2xx, 4xx, 5xx, error)",
    ["status_class"],
)
RETURNED = Counter(
    "notifications_returned_total",
    "Messages handed back to the queue unfinished, by cause "
    "(database, broker, shutdown, unexpected)",
    ["cause"],
)
IN_FLIGHT = Gauge("notifications_in_flight", "Messages being processed by this replica")
DELAY_BACKEND = Gauge(
    "notifications_delay_backend_info", "The delay backend in use (value 1)", ["backend"]
)


def status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"
