"""The Prometheus metrics every replica exports (served by :mod:`worker.health`)."""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram

from worker import __version__

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
    "notifications_provider_request_duration_seconds",
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
BUILD_INFO = Gauge(
    "notifications_build_info",
    "The worker's version and the Python it runs on (value 1)",
    ["version", "python"],
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)


def status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"


PARTITION_STATE = Gauge(
    "notifications_partition_state",
    "Health of each provider partition that has failed: 0 closed, 1 half-open, 2 open",
    ["partition"],
)
PARTITION_OPENED = Gauge(
    "notifications_partition_opened_timestamp_seconds",
    "When each open partition opened (Unix time; 0 when closed)",
    ["partition"],
)
PARTITION_TRANSITIONS = Counter(
    "notifications_partition_transitions_total",
    "Partition state changes seen by this replica, by the new state",
    ["state"],
)
PROBES = Counter(
    "notifications_partition_probes_total",
    "Probes of open partitions sent by this replica, by outcome",
    ["outcome"],
)
PARKED = Gauge(
    "notifications_parked_messages",
    "Messages parked in PostgreSQL, by partition (counted every few seconds)",
    ["partition"],
)
RELEASED_MESSAGES = Counter(
    "notifications_released_total", "Parked messages released back to the work queue"
)
RECOVERED_RETRIES = Counter(
    "notifications_retries_recovered_total",
    "Retries republished from PostgreSQL: overdue, not brought back by the delay backend",
)

DELIVERY_LIMIT_REACHED = Counter(
    "notifications_delivery_limit_reached_total",
    "Messages the broker dead-lettered to <queue>.limit for being returned WORKER_DELIVERY_LIMIT "
    "times (quorum mode), then run to their outcome from there",
)
