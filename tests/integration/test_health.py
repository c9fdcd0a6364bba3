"""The replica's /metrics, /healthz and /readyz on WORKER_METRICS_PORT."""

from __future__ import annotations

import asyncio
import platform
import socket

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from worker import __version__
from worker.replica import Replica
from worker.tooling.demo_provider import Rule

from .conftest import Harness, price_change

PYTHON = platform.python_version()


def sample(metrics: str, name: str) -> float:
    """The value of one sample, given as it is written (``name{label="value"}``), in Prometheus
    text format; 0 when it was never set."""
    lines = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


class Scrape:
    """One ``/metrics`` answer, parsed with prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels``; 0 when it was never set."""
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


async def scrape(http: aiohttp.ClientSession, base: str) -> Scrape:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        return Scrape(await response.text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_metrics_move_and_health_answers(harness: Harness) -> None:
    port = free_port()
    harness.provider.set_rules([Rule(audience="lapsed", status=403)])
    await harness.start(metrics_port=port)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{base}/healthz")).status == 200
        assert (await http.get(f"{base}/readyz")).status == 200
        before = await scrape(http, base)

        await harness.publish(price_change())
        await harness.publish(price_change(audience="lapsed"))
        await harness.wait_finished(2)
        after = await scrape(http, base)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("notifications_messages_total", outcome="sent") == 1
    assert moved("notifications_dead_letters_total", reason="rejected") == 1
    assert after.value("notifications_delay_backend_info", backend="ttl") == 1
    requests = "notifications_provider_request_duration_seconds_count"
    assert moved(requests, status_class="2xx") == 1
    assert moved(requests, status_class="4xx") == 1
    assert after.value("notifications_build_info", version=__version__, python=PYTHON) == 1


async def test_metrics_speak_openmetrics_to_a_scraper_that_asks(harness: Harness) -> None:
    port = free_port()
    await harness.start(metrics_port=port)
    openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/metrics"
        async with http.get(url, headers={"Accept": f"{openmetrics},text/plain;q=0.5"}) as answer:
            assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
            text = await answer.text()
        async with http.get(url) as classic:
            assert classic.headers["Content-Type"].startswith("text/plain")
    assert text.endswith("# EOF\n")
    families = {family.name: family for family in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    # OpenMetrics names a counter's family without _total, an info-like gauge as it is
    assert families["notifications_messages"].type == "counter"
    assert families["notifications_provider_request_duration_seconds"].type == "histogram"
    (build,) = families["notifications_build_info"].samples
    assert build.labels == {"version": __version__, "python": PYTHON}


@pytest.mark.parametrize(
    "unreachable",
    [
        {"database_url": "postgresql://u@127.0.0.1:1/x"},
        {"amqp_url": "amqp://guest:guest@127.0.0.1:1/"},
    ],
    ids=["database", "broker"],
)
async def test_replica_waits_unready_while_a_service_is_unreachable(
    harness: Harness, unreachable: dict[str, str]
) -> None:
    port = free_port()
    settings = harness.settings(metrics_port=port, **unreachable)
    stop = asyncio.Event()
    replica = asyncio.create_task(Replica(settings).run(stop))
    try:
        async with aiohttp.ClientSession() as http:

            async def alive() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/healthz")).status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await harness.wait_for(alive, what="/healthz")
            assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status == 503
    finally:
        stop.set()
        await asyncio.wait_for(replica, timeout=10)
