"""Prometheus metrics and the ``/metrics``, ``/healthz`` and ``/readyz`` endpoints.

``/healthz`` answers while the event loop runs; ``/readyz`` only while the replica is connected
to the broker and the database and is consuming.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

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

ReadinessCheck = Callable[[], Awaitable[bool]]


def status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"


class HealthServer:
    """Serves the endpoints on ``port``; ``ready`` is asked on every ``/readyz``."""

    def __init__(self, port: int, ready: ReadinessCheck) -> None:
        self._port = port
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = await self._ready()
        return web.json_response(
            {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
        )
