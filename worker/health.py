"""The replica's HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` answers while the event loop runs; ``/readyz`` only while the replica is connected
to the broker and the database and is consuming.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

ReadinessCheck = Callable[[], Awaitable[bool]]


class HealthServer:
    """Serves the endpoints on ``port``; ``ready`` is asked on every ``/readyz``."""

    def __init__(self, port: int, ready: ReadinessCheck) -> None:
        self._port = port
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        # prometheus-client's own handler: the OpenMetrics text format for a scraper that asks
        # for it (Accept: application/openmetrics-text), else the classic text format; gzip
        # when asked for.
        app.router.add_get("/metrics", make_aiohttp_handler())
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = await self._ready()
        return web.json_response(
            {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
        )
