"""worker/broker.py: a robust connection that goes round a cluster's node URLs, and the
multi-URL settings. Pins the aio-pika behaviour it relies on (each connection attempt clears
``transport`` before it dials ``url``) without a broker: ports nobody listens on."""

from __future__ import annotations

import socket

import pytest
from aio_pika.exceptions import AMQPConnectionError

from worker.broker import ClusterConnection, connect_cluster
from worker.settings import ConfigError, load_settings, mask_url


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def urls(count: int) -> list[str]:
    return [f"amqp://u:secret{n}@127.0.0.1:{closed_port()}/" for n in range(count)]


async def test_each_connection_attempt_dials_the_next_node() -> None:
    nodes = urls(3)
    connection = ClusterConnection(nodes, first=1)
    dialled = []
    for _ in range(4):
        connection.transport = None  # what RobustConnection does before each attempt
        dialled.append(str(connection.url))
    assert dialled == [nodes[1], nodes[2], nodes[0], nodes[1]]
    await connection.close()


async def test_connect_tries_every_node_and_raises_the_last_error() -> None:
    with pytest.raises((AMQPConnectionError, OSError)):
        await connect_cluster(urls(3), reconnect_interval=0.1)


def test_a_list_of_urls_is_a_setting_and_every_password_is_masked() -> None:
    nodes = ",".join(urls(3))
    settings = load_settings(amqp_url=nodes.replace(",", " , "))
    assert settings.amqp_urls == nodes.split(",")
    masked = settings.safe_dump()["amqp_url"]
    assert "secret" not in masked
    assert masked.count(":***@") == 3
    assert "secret" not in mask_url(nodes)


def test_every_url_of_the_list_must_be_amqp() -> None:
    with pytest.raises(ConfigError, match="WORKER_AMQP_URL") as raised:
        load_settings(amqp_url="amqp://a:pw1@h1/,http://b:pw2@h2/")
    assert "pw1" not in str(raised.value)
    assert "pw2" not in str(raised.value)


def test_attempt_queues_in_each_mode() -> None:
    assert load_settings().attempt_queues == 1
    assert load_settings(queue_type="quorum").attempt_queues == 10  # max_attempts 10
    assert load_settings(queue_type="quorum", max_attempts=50).attempt_queues == 11
