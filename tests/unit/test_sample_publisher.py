"""The compose stack's sample publisher: valid messages, published as market data does."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime

import aio_pika
import pytest

from worker.message import parse_message
from worker.tooling.sample_publisher import (
    AUDIENCES,
    CHANNELS,
    TICKERS,
    parse_args,
    price_change,
    publish,
)

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def test_every_sample_is_a_valid_message() -> None:
    rng = random.Random(7)
    now = datetime.now(UTC)
    seen = set()
    for _ in range(1000):
        body = price_change(rng, now)
        message = parse_message(json.dumps(body).encode(), now, content_type="application/json")
        seen.add((message.ticker, message.channel, message.audience))
    # every combination comes up, so the demo shows the flaky audience too
    assert len(seen) == len(TICKERS) * len(CHANNELS) * len(AUDIENCES)


def test_a_seed_repeats_the_samples() -> None:
    now = datetime.now(UTC)
    first = [price_change(random.Random(3), now) for _ in range(5)]
    again = [price_change(random.Random(3), now) for _ in range(5)]
    assert first == again


@pytest.mark.parametrize("argv", [["--count", "-1"], ["--interval", "-0.5"]])
def test_negative_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2


@pytest.mark.integration
async def test_publishes_persistent_json_to_the_source_exchange() -> None:
    exchange_name = f"test.{uuid.uuid4().hex[:8]}.price-change"
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        try:
            assert await publish(AMQP_URL, exchange_name, 3, 0, random.Random(1)) == 3
            received = [await queue.get(timeout=5) for _ in range(3)]
        finally:
            await exchange.delete()
    now = datetime.now(UTC)
    for incoming in received:
        assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert incoming.priority in (None, 0)
        parse_message(incoming.body, now, content_type=incoming.content_type)
