"""A stand-in for market data: publishes sample price changes to the source exchange.

``python -m worker.tooling.sample_publisher [--count N] [--interval S] [--seed K]`` publishes one
message every ``--interval`` seconds (``--count 0``: until SIGTERM or SIGINT) as market data
does (SPEC §1): UTF-8 JSON, persistent, publisher-confirmed, no priority, to
``WORKER_SOURCE_EXCHANGE`` on ``WORKER_AMQP_URL``. The audiences include ``b``, which the compose
stack's demo provider fails for email, so ``docker compose up`` shows retries as well as sends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import aio_pika
import structlog

from worker.logs import configure_logging
from worker.settings import ConfigError, load_settings
from worker.stopping import pause_unless_stopped

TICKERS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "JPM")
CHANNELS = ("email", "sms")
AUDIENCES = ("a", "b", "premium")

log = structlog.get_logger("worker.tooling.sample_publisher")


def price_change(rng: random.Random, now: datetime) -> dict[str, Any]:
    """One valid message (SPEC §1) for a random ticker, channel and audience."""
    price = rng.uniform(5, 900)
    return {
        "ticker": rng.choice(TICKERS),
        "price": f"{price:.2f}",
        "previous_price": f"{price * rng.uniform(0.95, 1.05):.2f}",
        "occurred_at": now.isoformat(),
        "channel": rng.choice(CHANNELS),
        "audience": rng.choice(AUDIENCES),
    }


async def publish(
    amqp_url: str, exchange_name: str, count: int, interval: float, rng: random.Random
) -> int:
    """Publish ``count`` messages (0: until stopped by a signal); how many were published."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    published = 0
    async with await aio_pika.connect_robust(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        while not stop.is_set() and (count == 0 or published < count):
            body = price_change(rng, datetime.now(UTC))
            message = aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key=f"prices.{body['ticker'].lower()}")
            published += 1
            log.info("published", number=published, **body)
            await pause_unless_stopped(stop, interval)
    return published


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=0, help="messages to publish; 0 = forever")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    parser.add_argument("--seed", type=int, default=None, help="repeatable choices")
    args = parser.parse_args(argv)
    if args.count < 0 or args.interval < 0:
        parser.error("--count and --interval must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"sample_publisher: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    published = asyncio.run(
        publish(
            settings.amqp_url,
            settings.source_exchange,
            args.count,
            args.interval,
            random.Random(args.seed),
        )
    )
    log.info("done", published=published)
    return 0


if __name__ == "__main__":
    sys.exit(main())
