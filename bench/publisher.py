"""The bench's publisher, a process of its own so that its CPU is counted apart from the rest.

Reads bodies (one JSON object a line) and publishes them, confirmed and persistent, in the
form the system under test reads: ``worker`` (the raw body to the source exchange, as market
data does), ``dramatiq`` (a Dramatiq message for the actor ``deliver``) or ``celery`` (a
Celery protocol-2 task message for ``bench.peers.celery_app.deliver``). The same bodies, so the
same idempotency keys, reach each system. ``--rate 0`` publishes as fast as confirms allow,
otherwise ``--rate`` a second in 20 ms ticks. Writes the ``time.monotonic()`` (the system-wide
CLOCK_MONOTONIC, comparable with the provider's log) of each publish to ``--out`` as JSON, with
the CPU seconds the publishing took (start-up excluded).

    python -m bench.publisher --amqp URL --format worker --target EXCHANGE --bodies F --out F
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aio_pika
import uvloop

CELERY_TASK = "bench.peers.celery_app.deliver"
DRAMATIQ_ACTOR = "deliver"
TICK = 0.02


def encode(fmt: str, body: bytes, queue: str) -> tuple[bytes, dict[str, Any]]:
    """The message bytes and the ``aio_pika.Message`` keyword arguments for one body."""
    text = body.decode()
    if fmt in ("worker", "raw"):
        return body, {"content_type": "application/json"}
    if fmt == "dramatiq":
        message = {
            "queue_name": queue,
            "actor_name": DRAMATIQ_ACTOR,
            "args": [text],
            "kwargs": {},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        }
        return json.dumps(message, separators=(",", ":")).encode(), {}
    if fmt == "celery":
        task_id = str(uuid.uuid4())
        headers = {
            "lang": "py",
            "task": CELERY_TASK,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "(body,)",
            "kwargsrepr": "{}",
            "origin": "bench.publisher",
            "ignore_result": True,
        }
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        payload = json.dumps([[text], {}, embed]).encode()
        return payload, {
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "headers": headers,
            "correlation_id": task_id,
            "priority": 0,
        }
    raise ValueError(f"unknown format {fmt!r}")


async def run(args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    cpu_started = time.process_time()
    sent_at: list[float] = []
    async with await aio_pika.connect(args.amqp) as connection:
        channel = await connection.channel(publisher_confirms=True)
        if args.format == "worker":
            exchange = await channel.get_exchange(args.target)
            routing_key = "prices.x"
        else:
            exchange = channel.default_exchange
            routing_key = args.target
        pending: list[Awaitable[Any]] = []
        began = time.monotonic()
        for index, body in enumerate(bodies):
            if args.rate > 0:
                due = began + index / args.rate
                if due - time.monotonic() > TICK / 2:
                    await asyncio.gather(*pending)
                    pending.clear()
                    await asyncio.sleep(max(due - time.monotonic(), 0))
            data, properties = encode(args.format, body, args.target)
            message = aio_pika.Message(
                data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties
            )
            sent_at.append(time.monotonic())
            pending.append(exchange.publish(message, routing_key=routing_key))
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    return {"sent_at": sent_at, "cpu_s": time.process_time() - cpu_started}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publisher", description=__doc__)
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--format", choices=("worker", "raw", "dramatiq", "celery"), required=True)
    parser.add_argument("--target", required=True, help="exchange (worker) or queue (peers)")
    parser.add_argument("--bodies", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rate", type=float, default=0)
    args = parser.parse_args()
    result = uvloop.run(run(args, Path(args.bodies).read_bytes().splitlines()))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
