"""Acks of fresh messages coalesced: one ``basic.ack`` with ``multiple`` for a run of them.

An ack is a frame, a write to the broker and the broker's work for it: measured here, about a
third of what the consumer costs per message. The ingress consumer's deliveries are registered
(:meth:`Acks.delivered`) in the order they arrive, which is delivery-tag order: its callbacks
run in that order. A delivery still finishes as before, acked when its outcome is settled, but
its ack goes out at the end of the loop turn in which it finished, together with the others:
every finished delivery below the oldest unfinished one is acked by one ``basic.ack multiple``
for the highest of them. One that finished behind an unfinished one waits for it at most
``hold_seconds``, then is acked alone. Nothing is acked before it is finished: a delivery the
broker sent but not yet registered has a higher tag than every registered one, which
``multiple`` never reaches. A channel's acks are sent in the order they were decided, by one
task: a ``multiple`` must not overtake an ack of a tag it covers (RabbitMQ closes the channel on
an unknown tag).

An outcome whose ack must follow its publish at once (a retry handed to the delay backend) is
acked ``at_once``: alone, its caller waiting until it is written, and its errors raised to it.
Fetched retries (``basic.get``, never registered) are acked alone, at once. If the channel is
gone before its acks are sent, the broker requeues those deliveries, and each copy finds its
key finished in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque

import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.abc import AbstractChannel

from worker.errors import describe_error

log = structlog.get_logger("worker.acks")

# A finished delivery behind an unfinished one is acked alone after this long.
HOLD_SECONDS = 0.05

_Ack = tuple[int, bool, "asyncio.Future[None] | None"]  # tag, multiple, waited for by


class _ChannelAcks:
    """One channel's registered deliveries not yet acked, and its acks to send, in order."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.tags: list[int] = []  # ascending
        self.finished: dict[int, float] = {}  # tag → loop time it finished
        self.outbox: deque[_Ack] = deque()
        self.sender: asyncio.Task[None] | None = None

    def decide(self, now: float, hold: float) -> None:
        """Queue the acks due: the finished run from the oldest, then the held ones."""
        run = 0
        while run < len(self.tags) and self.tags[run] in self.finished:
            del self.finished[self.tags[run]]
            run += 1
        if run:
            self.outbox.append((self.tags[run - 1], run > 1, None))
            del self.tags[:run]
        for tag in sorted(t for t, at in self.finished.items() if now - at >= hold):
            del self.finished[tag]
            self.tags.remove(tag)
            self.outbox.append((tag, False, None))


class Acks:
    def __init__(self, hold_seconds: float = HOLD_SECONDS) -> None:
        self._hold = hold_seconds
        self._channels: dict[AbstractChannel, _ChannelAcks] = {}
        self._flush_soon: asyncio.Handle | None = None
        self._flush_later: asyncio.TimerHandle | None = None

    def delivered(self, incoming: AbstractIncomingMessage) -> None:
        """Register a consumed delivery: its ack may be coalesced."""
        channel = _channel(incoming)
        if channel is None:
            return  # its channel is gone already: the broker requeues it
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _ChannelAcks(channel)
        tag = _tag(incoming)
        if not state.tags or tag > state.tags[-1]:
            state.tags.append(tag)
        else:
            bisect.insort(state.tags, tag)

    def forget(self, incoming: AbstractIncomingMessage) -> None:
        """It is settled otherwise (returned to the queue) or will never be: not to be acked."""
        channel = _channel(incoming)
        state = None if channel is None else self._channels.get(channel)
        if state is None:
            return
        tag = _tag(incoming)
        index = bisect.bisect_left(state.tags, tag)
        if index < len(state.tags) and state.tags[index] == tag:
            del state.tags[index]
            self._schedule()  # it may have held up a finished run

    async def ack(self, incoming: AbstractIncomingMessage, *, at_once: bool = False) -> None:
        channel = _channel(incoming)
        if channel is None:
            self._schedule()  # which drops what is left of the channel
            raise ChannelInvalidStateError("the channel of the delivery is closed")
        state = self._channels.get(channel)
        tag = _tag(incoming)
        if state is None or tag not in state.tags:
            await incoming.ack()  # fetched, not consumed: alone
            return
        loop = asyncio.get_running_loop()
        if not at_once:
            state.finished[tag] = loop.time()
            self._schedule()
            return
        self.forget(incoming)
        written: asyncio.Future[None] = loop.create_future()
        state.outbox.append((tag, False, written))
        self._send(state)
        await written

    async def close(self) -> None:
        """Ack every finished delivery now, and wait until every ack is written."""
        self._flush(everything=True)
        senders = [s.sender for s in self._channels.values() if s.sender is not None]
        if senders:
            await asyncio.wait(senders)

    def _schedule(self) -> None:
        if self._flush_soon is None:
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self._flush_soon = None
        self._flush()

    def _flush(self, everything: bool = False) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        held = False
        for channel, state in list(self._channels.items()):
            if channel.is_closed:
                self._lost(state, "the channel is closed")
                continue
            state.decide(now, 0.0 if everything else self._hold)
            self._send(state)
            held = held or bool(state.finished)
        if held and self._flush_later is None:
            self._flush_later = loop.call_later(self._hold, self._flush_held)

    def _flush_held(self) -> None:
        self._flush_later = None
        self._flush()

    def _send(self, state: _ChannelAcks) -> None:
        if state.outbox and state.sender is None:
            state.sender = asyncio.create_task(self._sender(state))

    async def _sender(self, state: _ChannelAcks) -> None:
        try:
            while state.outbox:
                tag, multiple, written = state.outbox[0]
                try:
                    await state.channel.basic_ack(tag, multiple=multiple)
                except (ChannelInvalidStateError, AMQPError, ConnectionError) as exc:
                    self._lost(state, describe_error(exc), exc)
                    return
                state.outbox.popleft()
                if written is not None and not written.done():
                    written.set_result(None)
        finally:
            state.sender = None

    def _lost(self, state: _ChannelAcks, why: str, error: BaseException | None = None) -> None:
        """The channel is gone: its deliveries not acked are the broker's to requeue."""
        self._channels.pop(state.channel, None)
        unsent = len(state.finished) + len(state.outbox)
        for _, _, written in state.outbox:
            if written is not None and not written.done():
                written.set_exception(error or ChannelInvalidStateError(why))
        state.outbox.clear()
        state.finished.clear()
        if unsent:
            log.warning("acks_lost", unsent=unsent, error=why)


def _channel(incoming: AbstractIncomingMessage) -> AbstractChannel | None:
    """The channel the delivery came on; None once it is closed (aio-pika raises then)."""
    try:
        return incoming.channel
    except ChannelInvalidStateError:
        return None


def _tag(incoming: AbstractIncomingMessage) -> int:
    tag = incoming.delivery_tag
    if tag is None:
        raise ValueError("a delivery without a delivery tag cannot be acked")
    return tag
