"""The session's cluster itself: three nodes that answer AMQP and replicate a quorum queue."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from worker.tooling.cluster import LocalCluster

pytestmark = pytest.mark.integration


async def test_three_nodes_answer_and_share_a_quorum_queue(cluster: LocalCluster) -> None:
    name = f"cluster.smoke.{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(cluster.urls[0]) as first:
        channel = await first.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=name)
    for url in cluster.urls[1:]:  # every node sees the queue and its message
        async with await aio_pika.connect(url) as other:
            channel = await other.channel()
            queue = await channel.declare_queue(name, passive=True)
            assert queue.declaration_result.message_count == 1
    async with await aio_pika.connect(cluster.urls[2]) as last:
        await (await last.channel()).queue_delete(name)
