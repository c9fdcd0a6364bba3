"""The TTL cascade (SPEC §3, backend ``ttl``): routing keys, binding patterns, and a simulation.

The simulation is a small model of RabbitMQ: topic exchanges (``*`` = exactly one word, ``#`` =
zero or more words), exchange-to-exchange bindings, the default exchange, and queues with a
fixed ``x-message-ttl`` that dead-letter to ``x-dead-letter-exchange`` (with
``x-dead-letter-routing-key`` or else the message's own routing key). A message is published
to the entry exchange with the routing key of its delay; the test follows it until it lands in
the work queue and checks that the waits add up to the delay and that it lands there once.

The bindings are built twice: by hand from the design (``_designed_broker``) and by recording
what :meth:`TtlCascade.declare` actually declares on a fake channel (``_recorded_broker``).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from worker.delay import (
    LEVELS,
    MAX_DELAY_SECONDS,
    MAX_PLUGIN_DELAY_MS,
    PluginDelay,
    TtlCascade,
    _pattern,
    delay_routing_key,
)
from worker.settings import QueueType, load_settings
from worker.topology import Names, Topology

QUEUE = "notifications.work"
NAMES = Names(QUEUE)
DELAYS = [0, 1, 2, 3, 5, 10, 1000, 604800, 2**28 - 1]
RANDOM_DELAYS = random.Random(20261127).sample(range(MAX_DELAY_SECONDS + 1), 40)


# --- topic matching ---------------------------------------------------------------------------


def topic_matches(pattern: str, routing_key: str) -> bool:
    """RabbitMQ topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.#", "b.a", False),
        ("#", "a.b", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.b.b.c", True),
        ("*.#", "a", True),
        ("*.*.#", "a", False),
        ("0.0.#", "0.0.notifications.work", True),
        ("*.1.#", "0.1.notifications.work", True),
        ("*.1.#", "1.0.notifications.work", False),
    ],
)
def test_topic_matcher(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


# --- routing keys and patterns ----------------------------------------------------------------


def test_constants() -> None:
    assert LEVELS == 28
    assert MAX_DELAY_SECONDS == 2**28 - 1


@pytest.mark.parametrize(
    ("seconds", "bits"),
    [
        (0, "0" * 28),
        (1, "0" * 27 + "1"),
        (2, "0" * 26 + "10"),
        (5, "0" * 25 + "101"),
        (1000, "0" * 18 + "1111101000"),
        (2**27, "1" + "0" * 27),
        (2**28 - 1, "1" * 28),
    ],
)
def test_delay_routing_key(seconds: int, bits: str) -> None:
    assert delay_routing_key(seconds, QUEUE) == ".".join(bits) + "." + QUEUE


@pytest.mark.parametrize("seconds", [*DELAYS, *RANDOM_DELAYS])
def test_delay_routing_key_is_28_binary_words_msb_first(seconds: int) -> None:
    words = delay_routing_key(seconds, QUEUE).split(".")
    assert len(words) == LEVELS + len(QUEUE.split("."))
    assert set(words[:LEVELS]) <= {"0", "1"}
    assert int("".join(words[:LEVELS]), 2) == seconds
    assert ".".join(words[LEVELS:]) == QUEUE


@pytest.mark.parametrize("destination", ["q", "notifications.work", "a.b.c.d"])
def test_delay_routing_key_ends_with_destination(destination: str) -> None:
    assert delay_routing_key(6, destination).endswith("1.1.0." + destination)


def test_pattern_shapes() -> None:
    assert _pattern(27, "1") == "1.#"
    assert _pattern(26, "0") == "*.0.#"
    assert _pattern(0, "1") == "*." * 27 + "1.#"


@pytest.mark.parametrize("level", range(LEVELS))
@pytest.mark.parametrize("bit", ["0", "1"])
def test_pattern_reads_exactly_the_bit_of_its_level(level: int, bit: str) -> None:
    pattern = _pattern(level, bit)
    for seconds in [0, 2**level, MAX_DELAY_SECONDS, MAX_DELAY_SECONDS - 2**level, *DELAYS]:
        key = delay_routing_key(seconds, QUEUE)
        has_bit = (seconds >> level) & 1 == 1
        assert topic_matches(pattern, key) is (has_bit == (bit == "1")), (level, bit, seconds)


# --- a small broker model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    source: str
    pattern: str
    destination: str
    to_exchange: bool


@dataclass(frozen=True)
class DelayQueue:
    ttl_ms: int
    dead_letter_exchange: str
    dead_letter_routing_key: str | None


@dataclass
class Broker:
    bindings: list[Binding] = field(default_factory=list)
    delay_queues: dict[str, DelayQueue] = field(default_factory=dict)
    work_queue: str = QUEUE
    entry: str = NAMES.retry

    def route(self, exchange: str, routing_key: str) -> set[str]:
        """The queues one publish reaches (a queue once, as RabbitMQ does)."""
        if exchange == "":  # the default exchange: routing key = queue name
            known = {self.work_queue, *self.delay_queues}
            return {routing_key} & known
        queues: set[str] = set()
        seen: set[str] = set()
        todo = [exchange]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for binding in self.bindings:
                if binding.source == current and topic_matches(binding.pattern, routing_key):
                    if binding.to_exchange:
                        todo.append(binding.destination)
                    else:
                        queues.add(binding.destination)
        return queues

    def deliver(self, routing_key: str) -> tuple[list[float], list[str]]:
        """Publish to the entry exchange; return the arrival times at the work queue and the
        path of queues visited. Fails on a message that is dropped or loops."""
        arrivals: list[float] = []
        path: list[str] = []
        events: list[tuple[float, int, str, str]] = [(0.0, 0, self.entry, routing_key)]
        sequence = 0
        while events:
            now, _, exchange, key = heapq.heappop(events)
            reached = self.route(exchange, key)
            assert reached, f"unroutable at {exchange!r} with {key!r}: message dropped"
            for queue in sorted(reached):
                path.append(queue)
                assert len(path) <= 4 * LEVELS, f"looping: {path}"
                if queue == self.work_queue:
                    arrivals.append(now)
                    continue
                spec = self.delay_queues[queue]
                sequence += 1
                heapq.heappush(
                    events,
                    (
                        now + spec.ttl_ms / 1000,
                        sequence,
                        spec.dead_letter_exchange,
                        spec.dead_letter_routing_key or key,
                    ),
                )
        return arrivals, path


def _designed_broker() -> Broker:
    """The cascade as designed, written out independently of ``TtlCascade.declare``."""
    broker = Broker()
    entry = NAMES.retry
    broker.bindings.append(Binding(entry, "0." * LEVELS + "#", QUEUE, to_exchange=False))
    for level in range(LEVELS):
        name = NAMES.delay_level(level)
        lower = NAMES.delay_level(level - 1) if level else None
        broker.bindings.append(
            Binding(entry, "0." * (LEVELS - 1 - level) + "1.#", name, to_exchange=True)
        )
        broker.bindings.append(Binding(name, _pattern(level, "1"), name, to_exchange=False))
        if lower is None:
            broker.bindings.append(Binding(name, _pattern(level, "0"), QUEUE, to_exchange=False))
            broker.delay_queues[name] = DelayQueue(2**level * 1000, "", QUEUE)
        else:
            broker.bindings.append(Binding(name, _pattern(level, "0"), lower, to_exchange=True))
            broker.delay_queues[name] = DelayQueue(2**level * 1000, lower, None)
    return broker


# --- recording what TtlCascade.declare declares -----------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.exchanges: dict[str, tuple[str, bool]] = {}
        self.queues: dict[str, tuple[bool, dict[str, Any]]] = {}
        self.bindings: list[Binding] = []
        self.published: list[tuple[object, str, bool]] = []


class _FakeExchange:
    def __init__(self, recorder: _Recorder, name: str) -> None:
        self.recorder = recorder
        self.name = name

    async def bind(self, exchange: _FakeExchange, routing_key: str) -> None:
        """aio-pika: ``self`` receives from ``exchange``."""
        self.recorder.bindings.append(Binding(exchange.name, routing_key, self.name, True))

    async def publish(self, message: object, routing_key: str, mandatory: bool = True) -> None:
        self.recorder.published.append((message, routing_key, mandatory))


class _FakeQueue:
    def __init__(self, recorder: _Recorder, name: str) -> None:
        self.recorder = recorder
        self.name = name

    async def bind(self, exchange: _FakeExchange, routing_key: str) -> None:
        self.recorder.bindings.append(Binding(exchange.name, routing_key, self.name, False))


class _FakeChannel:
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    async def declare_exchange(
        self, name: str, type: Any, durable: bool = False, **_: Any
    ) -> _FakeExchange:
        assert name not in self.recorder.exchanges, f"declared twice: {name}"
        self.recorder.exchanges[name] = (str(getattr(type, "value", type)), durable)
        return _FakeExchange(self.recorder, name)

    async def declare_queue(
        self,
        name: str,
        durable: bool = False,
        arguments: dict[str, Any] | None = None,
        **_: Any,
    ) -> _FakeQueue:
        assert name not in self.recorder.queues, f"declared twice: {name}"
        self.recorder.queues[name] = (durable, dict(arguments or {}))
        return _FakeQueue(self.recorder, name)


def _topology(
    recorder: _Recorder, queue: str = QUEUE, queue_type: QueueType = QueueType.CLASSIC
) -> Topology:
    count = load_settings(queue_type=queue_type).attempt_queues
    return Topology(
        names=Names(queue),
        work_queues=[
            cast(AbstractQueue, _FakeQueue(recorder, name))
            for name in Names(queue).attempt_queues(count)
        ],
        ingress_queue=cast(AbstractQueue, _FakeQueue(recorder, f"{queue}.ingress")),
        queue_type=queue_type,
    )


async def _declare(
    queue: str = QUEUE, queue_type: QueueType = QueueType.CLASSIC
) -> tuple[TtlCascade, _Recorder]:
    recorder = _Recorder()
    topology = _topology(recorder, queue, queue_type)
    cascade = await TtlCascade.declare(
        cast(AbstractChannel, _FakeChannel(recorder)),
        topology,
        load_settings(queue=queue, queue_type=queue_type),
    )
    return cascade, recorder


def _broker_of(recorder: _Recorder) -> Broker:
    broker = Broker(bindings=list(recorder.bindings))
    for name, (_, arguments) in recorder.queues.items():
        broker.delay_queues[name] = DelayQueue(
            arguments["x-message-ttl"],
            arguments["x-dead-letter-exchange"],
            arguments.get("x-dead-letter-routing-key"),
        )
    return broker


async def _recorded_broker(queue_type: QueueType = QueueType.CLASSIC) -> Broker:
    _, recorder = await _declare(queue_type=queue_type)
    return _broker_of(recorder)


# --- the cascade ------------------------------------------------------------------------------


def _assert_delivered_after(broker: Broker, seconds: int) -> None:
    arrivals, path = broker.deliver(delay_routing_key(seconds, QUEUE))
    assert arrivals == [seconds], path
    assert path[-1] == QUEUE
    assert path.count(QUEUE) == 1
    # one delay queue per set bit, highest level first: never waits behind a longer delay
    expected_levels = [level for level in reversed(range(LEVELS)) if seconds >> level & 1]
    assert path[:-1] == [NAMES.delay_level(level) for level in expected_levels]


@pytest.mark.parametrize("seconds", DELAYS)
def test_designed_cascade_delivers_after_exactly_the_delay(seconds: int) -> None:
    _assert_delivered_after(_designed_broker(), seconds)


@pytest.mark.parametrize("seconds", DELAYS)
async def test_declared_cascade_delivers_after_exactly_the_delay(seconds: int) -> None:
    _assert_delivered_after(await _recorded_broker(), seconds)


async def test_declared_cascade_random_delays() -> None:
    broker = await _recorded_broker()
    for seconds in RANDOM_DELAYS:
        _assert_delivered_after(broker, seconds)


async def test_declared_bindings_are_the_designed_ones() -> None:
    recorded = await _recorded_broker()
    designed = _designed_broker()
    assert sorted(recorded.bindings, key=repr) == sorted(designed.bindings, key=repr)
    assert len(recorded.bindings) == len(set(recorded.bindings))
    assert recorded.delay_queues == designed.delay_queues


async def test_declared_objects() -> None:
    _, recorder = await _declare()
    levels = [NAMES.delay_level(level) for level in range(LEVELS)]
    assert levels[0] == "notifications.work.delay.00"
    assert levels[-1] == "notifications.work.delay.27"
    assert recorder.exchanges == {
        name: ("topic", True) for name in ["notifications.work.retry", *levels]
    }
    assert set(recorder.queues) == set(levels)
    for level, name in enumerate(levels):
        durable, arguments = recorder.queues[name]
        assert durable
        assert arguments["x-queue-type"] == "classic"
        assert arguments["x-message-ttl"] == 2**level * 1000


async def test_names_follow_the_work_queue() -> None:
    _, recorder = await _declare("alerts.work")
    names = {*recorder.exchanges, *recorder.queues}
    assert all(name.startswith("alerts.work.") for name in names)
    assert "alerts.work.retry" in recorder.exchanges


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [
        (0.0, 0),
        (0.4, 1),  # rounded up: never before a Retry-After
        (1.0, 1),
        (4.2, 5),
        (4.6, 5),
        (120.0, 120),
        (-3.0, 0),
        (float(MAX_DELAY_SECONDS), MAX_DELAY_SECONDS),
        (1e12, MAX_DELAY_SECONDS),
        (float("inf"), MAX_DELAY_SECONDS),
        (float("nan"), 0),
    ],
)
async def test_publish_rounds_up_and_clamps_the_delay(delay: float, seconds: int) -> None:
    cascade, recorder = await _declare()
    message = aio_pika.Message(b"{}", headers={"x-attempt": 3})
    await cascade.publish(message, delay)
    assert recorder.published == [(message, delay_routing_key(seconds, QUEUE), True)]


@pytest.mark.parametrize(
    ("delay", "milliseconds"),
    [
        (0.0, 0),
        (1.5, 1500),
        (0.0014, 2),
        (-2.0, 0),
        (60 * 86400.0, MAX_PLUGIN_DELAY_MS),
    ],
)
async def test_plugin_publish_sets_x_delay_within_the_timer_limit(
    delay: float, milliseconds: int
) -> None:
    recorder = _Recorder()
    plugin = PluginDelay(cast(Any, _FakeExchange(recorder, "q.retry")), _topology(recorder))
    message = aio_pika.Message(b"{}")
    await plugin.publish(message, delay)
    # not mandatory: the plugin returns every delayed publish as unroutable
    assert recorder.published == [(message, QUEUE, False)]
    assert message.headers["x-delay"] == milliseconds


# --- quorum mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [0, 1, 3, 9, 40])
@pytest.mark.parametrize("seconds", [0, 1, 5, 1000])
async def test_quorum_cascade_delivers_to_the_queue_of_the_attempt(
    attempt: int, seconds: int
) -> None:
    cascade, recorder = await _declare(queue_type=QueueType.QUORUM)
    broker = _broker_of(recorder)
    destination = cascade.topology.queue_for(attempt)
    broker.work_queue = destination
    assert destination == (QUEUE if attempt == 0 else f"{QUEUE}.a{min(attempt, 9)}")
    await cascade.publish(aio_pika.Message(b"{}", headers={"x-attempt": attempt}), seconds)
    ((_, routing_key, _),) = recorder.published
    arrivals, path = broker.deliver(routing_key)
    assert arrivals == [seconds], path
    assert path[-1] == destination


async def test_quorum_delay_levels_dead_letter_at_least_once() -> None:
    _, recorder = await _declare(queue_type=QueueType.QUORUM)
    assert recorder.exchanges[NAMES.delay_exit] == ("topic", True)
    for level in range(LEVELS):
        _, arguments = recorder.queues[NAMES.delay_level(level)]
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
        assert arguments["x-overflow"] == "reject-publish"
        assert arguments["x-delivery-limit"] == 1000
