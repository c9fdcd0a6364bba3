"""The job both peers run: one provider call per message, as the worker makes it.

Environment: ``BENCH_AMQP_URL``, ``BENCH_QUEUE``, ``BENCH_PROVIDER_URL``,
``BENCH_MAX_ATTEMPTS`` (attempts in all, as ``WORKER_MAX_ATTEMPTS``),
``BENCH_BACKOFF_BASE_SECONDS`` and ``BENCH_BACKOFF_MAX_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime

import requests

from worker.message import InvalidMessage, parse_message

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("BENCH_QUEUE", "bench.peer")
PROVIDER_URL = os.environ.get("BENCH_PROVIDER_URL", "http://127.0.0.1:8081")
MAX_ATTEMPTS = int(os.environ.get("BENCH_MAX_ATTEMPTS", "10"))
BACKOFF_BASE_SECONDS = float(os.environ.get("BENCH_BACKOFF_BASE_SECONDS", "5"))
BACKOFF_MAX_SECONDS = float(os.environ.get("BENCH_BACKOFF_MAX_SECONDS", "3600"))
TIMEOUT_SECONDS = 10.0

logger = logging.getLogger("bench.peers")
_local = threading.local()


class RetryableError(Exception):
    """The provider asked for a retry (408, 425, 429, 5xx)."""


def retryable(status: int) -> bool:
    return status in (408, 425, 429) or 500 <= status <= 599


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def deliver(body: str) -> None:
    """Send one price change; raise to have it retried, return when done (sent, 409 or a
    permanent rejection, which is logged and dropped)."""
    try:
        message = parse_message(body.encode(), datetime.now(UTC))
    except InvalidMessage as exc:
        logger.warning("invalid message dropped: %s", exc)
        return
    response = _session().post(
        f"{PROVIDER_URL}/v1/notifications/{message.channel}",
        json=message.provider_body(),
        headers={"Idempotency-Key": message.idempotency_key},
        timeout=TIMEOUT_SECONDS,
    )
    if retryable(response.status_code):
        raise RetryableError(f"provider answered {response.status_code}")
    if response.status_code >= 400 and response.status_code != 409:
        logger.warning("rejected by the provider with %d, dropped", response.status_code)
