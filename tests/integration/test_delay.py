"""The delay backends: a retry comes back to the work queue on time, priority and headers intact.

``ttl`` runs on any broker; ``plugin`` runs when the broker has rabbitmq_delayed_message_exchange
and is skipped, with the reason, when it has not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from worker.delay import DelayBackend, broker_has_plugin, declare_delay_backend
from worker.settings import DelayBackendName
from worker.topology import declare_topology

from .conftest import AMQP_URL, Harness, price_change


@pytest.fixture(params=[DelayBackendName.TTL, DelayBackendName.PLUGIN])
async def backend(request: pytest.FixtureRequest, harness: Harness) -> AsyncIterator[DelayBackend]:
    name: DelayBackendName = request.param
    if name is DelayBackendName.PLUGIN and not await broker_has_plugin(AMQP_URL, harness.names):
        pytest.skip("the broker has no rabbitmq_delayed_message_exchange plugin")
    channel = await harness.amqp.channel(publisher_confirms=True, on_return_raises=True)
    settings = harness.settings(delay_backend=name)
    topology = await declare_topology(channel, settings)
    yield await declare_delay_backend(AMQP_URL, channel, topology, settings)
    await channel.close()


async def test_mixed_delays_each_arrive_on_time(harness: Harness, backend: DelayBackend) -> None:
    delays = [10, 3, 1, 10, 1, 3, 3, 1, 10]
    due: dict[str, float] = {}
    for index, delay in enumerate(delays):
        message = aio_pika.Message(
            b"{}",
            message_id=str(index),
            priority=7,
            headers={"x-attempt": 3, "x-first-seen-at": "2026-11-27T10:00:00+00:00"},
        )
        due[str(index)] = time.monotonic() + delay
        await backend.publish(message, delay)

    arrived: dict[str, tuple[float, AbstractIncomingMessage]] = {}
    channel = await harness.amqp.channel()
    queue = await channel.get_queue(harness.names.queue)
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        arrived[str(message.message_id)] = (time.monotonic(), message)
        await message.ack()
        if len(arrived) == len(delays):
            done.set()

    await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), timeout=20)

    lateness = {mid: at - due[mid] for mid, (at, _) in arrived.items()}
    by_delay = sorted((delays[int(k)], round(v, 3)) for k, v in lateness.items())
    print("lateness (s) by delay:", by_delay)
    assert all(-0.05 <= late <= 1.0 for late in lateness.values()), lateness
    for _, received in arrived.values():
        assert received.priority == 7
        headers = received.headers or {}
        assert headers["x-attempt"] == 3
        assert headers["x-first-seen-at"] == "2026-11-27T10:00:00+00:00"


async def test_worker_retries_through_the_backend(harness: Harness, backend: DelayBackend) -> None:
    from worker.tooling.demo_provider import Rule

    harness.provider.set_rules([Rule(status=500, times=1)])
    await harness.start(delay_backend=backend.name, backoff_base_seconds=1, backoff="constant")
    await harness.publish(price_change())
    await harness.wait_finished(1)

    first, second = harness.provider.requests
    assert (first.status, second.status) == (500, 200)
    assert 0.9 <= second.at - first.at <= 2.5


async def test_auto_keeps_a_retry_exchange_declared_for_the_other_backend(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker gained the plugin after <queue>.retry was declared for ttl: auto keeps the
    cascade (and says so) instead of failing every start with PRECONDITION_FAILED."""
    import worker.delay as delay_module

    channel = await harness.amqp.channel(publisher_confirms=True, on_return_raises=True)
    topology = await declare_topology(channel, harness.settings())
    first = await declare_delay_backend(
        AMQP_URL, channel, topology, harness.settings(delay_backend="ttl")
    )
    assert first.name is DelayBackendName.TTL

    async def gained(amqp_url: str, names: object) -> bool:
        return True

    monkeypatch.setattr(delay_module, "broker_has_plugin", gained)
    kept = await declare_delay_backend(
        AMQP_URL, channel, topology, harness.settings(delay_backend="auto")
    )
    assert kept.name is DelayBackendName.TTL
    assert not channel.is_closed
    await channel.close()


async def test_auto_with_a_retry_exchange_of_a_type_it_cannot_use_is_one_line(
    harness: Harness,
) -> None:
    from worker.settings import ConfigError

    channel = await harness.amqp.channel(publisher_confirms=True, on_return_raises=True)
    topology = await declare_topology(channel, harness.settings())
    await channel.declare_exchange(topology.names.retry, aio_pika.ExchangeType.DIRECT)
    has_plugin = await broker_has_plugin(AMQP_URL, harness.names)
    if has_plugin:
        pytest.skip("the broker has the plugin: a direct exchange is simply in the way")
    with pytest.raises(ConfigError, match="DELAY_BACKEND"):
        await declare_delay_backend(
            AMQP_URL, channel, topology, harness.settings(delay_backend="auto")
        )
    await channel.close()
