"""Connections to a broker that may be several nodes (``WORKER_AMQP_URL`` = a comma list).

aio-pika's robust connection reconnects by itself and restores channels, QoS and consumers,
but always to the one URL it was made with: when that node dies it would knock on the dead
node's door until it returns. :class:`ClusterConnection` is that robust connection with the
list: every connection attempt (the first and each reconnection) goes to the next node in
turn, so a replica whose node died is back on another one at its first reconnection attempt.

It relies on how aio-pika 10 starts an attempt (``RobustConnection.__connect_transport``:
clear ``transport``, then ``Connection.connect``, which dials ``self.url``): the attempt's URL
is chosen where ``transport`` is cleared. ``tests/unit/test_broker.py`` pins that behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection, AbstractRobustConnection, UnderlayConnection
from aio_pika.exceptions import AMQPConnectionError
from yarl import URL

from worker.settings import mask_url


class ClusterConnection(RobustConnection):
    """A robust connection that tries the nodes' URLs in turn, starting at ``first``."""

    def __init__(self, urls: Sequence[str], first: int = 0, **kwargs: Any) -> None:
        self._urls = [URL(url) for url in urls]
        self._turn = first
        self._current = self._urls[first % len(self._urls)]
        super().__init__(self._current, **kwargs)
        self._turn = first  # Connection.__init__ cleared transport once already

    @property
    def url(self) -> URL:
        """The node this connection is on, or is trying next."""
        return self._current

    @url.setter
    def url(self, value: URL) -> None:  # Connection.__init__ and update_secret set it
        self._current = value

    @property
    def transport(self) -> UnderlayConnection | None:
        return self.__dict__.get("_transport")

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        # Cleared at the start of every connection attempt (and at close): the next node.
        if value is None and "_urls" in self.__dict__ and not self.__dict__.get("_close_called"):
            self._current = self._urls[self._turn % len(self._urls)]
            self._turn += 1
        self.__dict__["_transport"] = value

    @property
    def masked_url(self) -> str:
        return mask_url(str(self._current))


async def connect_cluster(urls: Sequence[str], **kwargs: Any) -> ClusterConnection:
    """A robust connection to the first of ``urls`` that answers; raises the last error if
    none does. Later reconnections go round the list by themselves."""
    error: BaseException | None = None
    for first in range(len(urls)):
        connection = ClusterConnection(urls, first=first, **kwargs)
        try:
            await connection.connect()
            return connection
        except (AMQPConnectionError, OSError) as exc:
            error = exc
            await connection.close()
    assert error is not None
    raise error


async def connect_first(urls: Sequence[str], timeout: float = 10) -> AbstractConnection:
    """A plain (not robust) connection to the first of ``urls`` that answers, for short-lived
    clients (the admin, probes, tests); raises the last error if none does."""
    error: BaseException | None = None
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=timeout)
        except (AMQPConnectionError, OSError, TimeoutError) as exc:
            error = exc
    assert error is not None
    raise error


def node_of(connection: AbstractRobustConnection) -> str:
    """The (masked) URL a connection is on, for logs."""
    if isinstance(connection, ClusterConnection):
        return connection.masked_url
    return mask_url(str(getattr(connection, "url", "")))
