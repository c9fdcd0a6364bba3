"""Coalesced acks (worker.acks) on a real broker: nothing acked before it is finished, a run of
finished deliveries acked by one frame, a held one acked alone, a returned one requeued.

What the broker holds is read back the only way a client can: the channel is closed, and what
was not acked comes back on the next consume.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelInvalidStateError

from worker.acks import Acks


class Consumer:
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, acks: Acks) -> None:
        self.channel = channel
        self.queue = queue
        self.acks = acks
        self.got: dict[bytes, AbstractIncomingMessage] = {}
        self.arrived = asyncio.Event()

    async def on_message(self, incoming: AbstractIncomingMessage) -> None:
        self.acks.delivered(incoming)
        self.got[incoming.body] = incoming
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.got) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def queue_name(amqp: AbstractConnection) -> AsyncIterator[str]:
    name = f"test-acks-{uuid.uuid4().hex[:8]}"
    channel = await amqp.channel()
    await channel.declare_queue(name)
    for body in (b"1", b"2", b"3"):
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=name)
    yield name
    await channel.queue_delete(name)
    await channel.close()


async def consume(amqp: AbstractConnection, name: str, acks: Acks) -> Consumer:
    channel = await amqp.channel()
    queue = await channel.get_queue(name)
    consumer = Consumer(channel, queue, acks)
    await queue.consume(consumer.on_message)
    await consumer.wait_for(3)
    return consumer


async def left_after_close(amqp: AbstractConnection, consumer: Consumer, name: str) -> set[bytes]:
    """Close the channel (the broker requeues what it was not acked for); what is queued."""
    if not consumer.channel.is_closed:
        await consumer.channel.close()
    channel = await amqp.channel()
    queue = await channel.get_queue(name)
    left = set()
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        left.add(message.body)
    await channel.close()
    return left


async def test_a_run_is_acked_once_all_of_it_finished(
    amqp: AbstractConnection, queue_name: str
) -> None:
    acks = Acks(hold_seconds=30)
    consumer = await consume(amqp, queue_name, acks)
    # finished out of order; the oldest last: nothing may go before it
    await acks.ack(consumer.got[b"3"])
    await acks.ack(consumer.got[b"2"])
    await asyncio.sleep(0.2)
    await acks.ack(consumer.got[b"1"])
    await asyncio.sleep(0.2)
    assert await left_after_close(amqp, consumer, queue_name) == set()


async def test_nothing_unfinished_is_acked(amqp: AbstractConnection, queue_name: str) -> None:
    acks = Acks(hold_seconds=30)
    consumer = await consume(amqp, queue_name, acks)
    await acks.ack(consumer.got[b"2"])
    await acks.ack(consumer.got[b"3"])
    await asyncio.sleep(0.3)
    # 1 unfinished holds 2 and 3 back (their hold is long): all three come back
    assert await left_after_close(amqp, consumer, queue_name) == {b"1", b"2", b"3"}


async def test_a_held_ack_goes_alone_after_its_hold(
    amqp: AbstractConnection, queue_name: str
) -> None:
    acks = Acks(hold_seconds=0.1)
    consumer = await consume(amqp, queue_name, acks)
    await acks.ack(consumer.got[b"3"])
    await asyncio.sleep(0.5)
    assert await left_after_close(amqp, consumer, queue_name) == {b"1", b"2"}


async def test_at_once_and_returned(amqp: AbstractConnection, queue_name: str) -> None:
    acks = Acks(hold_seconds=30)
    consumer = await consume(amqp, queue_name, acks)
    await acks.ack(consumer.got[b"2"], at_once=True)  # written when it returns
    # 1 returned to the queue (then forgotten, as the replica does), 3 finished: 3 is acked
    # with `multiple` at once, which must not cover 1, requeued before it
    await consumer.got[b"1"].nack(requeue=True)
    acks.forget(consumer.got[b"1"])
    await acks.ack(consumer.got[b"3"])
    await asyncio.sleep(0.3)
    # (1 comes back to this consumer, with a new tag, and is not acked)
    assert await left_after_close(amqp, consumer, queue_name) == {b"1"}


async def test_close_acks_everything_finished(amqp: AbstractConnection, queue_name: str) -> None:
    acks = Acks(hold_seconds=30)
    consumer = await consume(amqp, queue_name, acks)
    await acks.ack(consumer.got[b"3"])
    await acks.close()
    assert await left_after_close(amqp, consumer, queue_name) == {b"1", b"2"}


async def test_acks_of_a_closed_channel_are_dropped(
    amqp: AbstractConnection, queue_name: str
) -> None:
    acks = Acks(hold_seconds=30)
    consumer = await consume(amqp, queue_name, acks)
    await acks.ack(consumer.got[b"3"])
    await consumer.channel.close()
    with pytest.raises(ChannelInvalidStateError):  # as aio-pika's own ack would
        await acks.ack(consumer.got[b"1"])
    acks.forget(consumer.got[b"2"])  # returned, as the replica does: nothing to do
    await asyncio.sleep(0.1)  # the flush found the channel closed, and dropped what it held
    await acks.close()
    assert await left_after_close(amqp, consumer, queue_name) == {b"1", b"2", b"3"}
