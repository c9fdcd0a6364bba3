"""The floor: the smallest honest loop that does a delivery's external work and nothing else.

aio-pika consume with the worker's prefetch; per message the worker's parse (its idempotency key
and provider body), one ``INSERT … ON CONFLICT`` claim,
one aiohttp POST to the provider, one ``UPDATE``, then the ack. asyncpg and uvloop, no ORM,
no priorities, no retries, no logs. ``python -m bench --systems floor worker`` runs it as a
system beside the worker.

    python -m bench.floor --dsn DSN --amqp URL --queue Q --provider URL --prefetch 16
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from datetime import UTC, datetime

import aio_pika
import aiohttp
import asyncpg
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from worker.message import parse_message

SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_deliveries (
    idempotency_key text PRIMARY KEY,
    status text NOT NULL,
    sent_at timestamptz
)
"""
CLAIM = """
INSERT INTO floor_deliveries (idempotency_key, status) VALUES ($1, 'pending')
ON CONFLICT (idempotency_key) DO NOTHING RETURNING 1
"""
MARK_SENT = """
UPDATE floor_deliveries SET status = 'sent', sent_at = now() WHERE idempotency_key = $1
"""


async def run(args: argparse.Namespace) -> None:
    pool = await asyncpg.create_pool(args.dsn, min_size=args.prefetch, max_size=args.prefetch)
    await pool.execute(SCHEMA)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.prefetch))
    connection = await aio_pika.connect(args.amqp)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=args.prefetch)
    queue = await channel.declare_queue(args.queue, durable=True)

    async def deliver(message: AbstractIncomingMessage) -> None:
        change = parse_message(message.body, datetime.now(UTC))  # the worker's key and body
        key = change.idempotency_key
        if await pool.fetchval(CLAIM, key) is not None:
            url = f"{args.provider}/v1/notifications/{change.channel}"
            payload = change.provider_body()
            async with session.post(url, json=payload, headers={"Idempotency-Key": key}) as r:
                await r.read()
            await pool.execute(MARK_SENT, key)
        await message.ack()

    await queue.consume(deliver)
    print("started", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await connection.close()
    await session.close()
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    for name in ("--dsn", "--amqp", "--queue", "--provider"):
        parser.add_argument(name, required=True)
    parser.add_argument("--prefetch", type=int, default=16)
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
