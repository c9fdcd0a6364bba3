"""The parking lot on the real database: a key parked again while its earlier row is being
released is kept, never merged away (the bench once lost such messages); a topic's newest
parked price is released before its older ones, which then end superseded in SQL."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from sqlalchemy import text

from worker.breaker import BreakerConfig
from worker.parking import Parked, ParkingLot, decode_headers, encode_headers
from worker.partitions import PartitionBoard
from worker.persistence import create_engine


def parked(
    key: str, topic: str = "T1|email|b", attempt: int = 1, age: timedelta = timedelta(0)
) -> Parked:
    now = datetime.now(UTC)
    return Parked(
        partition="email|b",
        topic_key=topic,
        idempotency_key=key,
        attempt=attempt,
        message=aio_pika.Message(b"{}", headers={"key": key}, content_type="application/json"),
        occurred_at=now - age,
        due_at=now,
        expires_at=now + timedelta(hours=1),
        payload_json=f'{{"key": "{key}"}}',
        first_seen_at=now - age,
    )


@pytest.fixture
async def lot(database_url: str) -> AsyncIterator[ParkingLot]:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+asyncpg://"), 4)
    lot = ParkingLot(
        engine, PartitionBoard(engine, ("channel", "audience"), BreakerConfig(), 25), 10
    )
    try:
        yield lot
    finally:
        await lot.close()
        await engine.dispose()


async def test_a_key_parked_again_during_its_release_is_kept(lot: ParkingLot) -> None:
    engine = lot._engine
    await lot.park(parked("k"))
    releasing = engine.execution_options(isolation_level="READ COMMITTED")
    async with releasing.begin() as conn:  # a release: rows locked, then deleted
        await conn.execute(text("SELECT id FROM parked_messages FOR UPDATE"))
        await conn.execute(text("DELETE FROM parked_messages"))
        again = asyncio.create_task(lot.park(parked("k")))  # its copy, parked again
        await asyncio.sleep(0.3)
    await again
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT idempotency_key FROM parked_messages"))).all()
    assert [row.idempotency_key for row in rows] == ["k"]


async def test_a_topic_releases_its_newest_price_first_and_the_older_ones_once_it_is_sent(
    lot: ParkingLot,
) -> None:
    """Released together, an older price (fewer attempts, so a higher priority) would be sent
    first and the newest after it: the newest goes alone, the older ones once it is sent."""
    await asyncio.gather(
        lot.park(parked("oldest", attempt=0, age=timedelta(seconds=4))),
        lot.park(parked("older", attempt=0, age=timedelta(seconds=2))),
        lot.park(parked("newest", attempt=1, age=timedelta(seconds=1))),
        lot.park(parked("old", attempt=0, age=timedelta(seconds=3))),
        lot.park(parked("other topic", topic="T2|email|b", attempt=3)),
    )
    published: list[tuple[aio_pika.Message, int]] = []

    async def publish(message: aio_pika.Message, attempt: int) -> None:
        published.append((message, attempt))

    async def tick() -> list[tuple[str, int | None, bool]]:
        """The keys released, each with its priority and whether it goes to the last queue."""
        await lot.tick(publish)
        keys = sorted((str(m.headers["key"]), m.priority, a > 100) for m, a in published)
        published.clear()
        return keys

    # at their attempts' priorities (10 - attempts) and work queues
    assert await tick() == [("newest", 9, False), ("other topic", 7, False)]
    assert await tick() == []  # held while the newest is on its way
    await lot.park(parked("newer than sent", attempt=2, age=timedelta(seconds=0.5)))
    async with lot._engine.begin() as conn:  # the newest is sent
        await conn.execute(
            text(
                "INSERT INTO topic_watermarks (topic_key, occurred_at) "
                "VALUES ('T1|email|b', now() - interval '1 second')"
            )
        )
    async with lot._engine.begin() as conn:
        # "old" was tried before it was parked; "older" was sent meanwhile (a copy's send)
        await conn.execute(
            text(
                "INSERT INTO deliveries (idempotency_key, topic_key, status, attempts,"
                " first_seen_at, occurred_at, payload, last_error) VALUES"
                " ('old', 'T1|email|b', 'pending', 1, now(), now(), '{}', 'timeout'),"
                " ('older', 'T1|email|b', 'sent', 1, now(), now(), '{}', NULL)"
            )
        )
        # parked by a revision before 0007: no payload to write a deliveries row from
        await conn.execute(
            text(
                "INSERT INTO parked_messages (partition_key, idempotency_key, attempt, body,"
                " headers, occurred_at, due_at, expires_at, topic_key) VALUES"
                " ('email|b', 'of 0006', 0, '{}', :headers, now() - interval '5 s', now(),"
                " now() + interval '1 hour', 'T1|email|b')"
            ),
            {"headers": encode_headers({"key": "of 0006"})},
        )
    # older than what was sent and expired as well: to end `expired` in a replica
    expired = parked("expired", attempt=0, age=timedelta(seconds=6))
    await lot.park(dataclasses.replace(expired, expires_at=datetime.now(UTC)))
    # older than what was sent: ended superseded here, without a publish; one parked without
    # a payload (or expired) goes to end in a replica, after anything that may be sent (the
    # lowest priority, the last work queue); a newer one as ever
    assert await tick() == [
        ("expired", 0, True),
        ("newer than sent", 8, False),
        ("of 0006", 0, True),
    ]
    async with lot._engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT idempotency_key, status, attempts, payload, last_error FROM deliveries"
                " ORDER BY 1"
            )
        )
        ended = {row.idempotency_key: tuple(row)[1:] for row in rows}
        left = (await conn.execute(text("SELECT count(*) FROM parked_messages"))).scalar()
    assert ended == {
        "old": ("superseded", 1, {}, "superseded; an earlier attempt got no answer and may"
                " have been delivered (timeout)"),
        "older": ("sent", 1, {}, None),  # left as it was
        "oldest": ("superseded", 0, {"key": "oldest"}, None),
    }  # fmt: skip
    assert left == 0


def test_headers_come_back_as_they_were() -> None:
    headers = {"x-attempt": 3, "blob": b"\x00\xff", "nested": {"a": [1, "b"]}, "text": "é\x00"}
    back = decode_headers(encode_headers(headers))
    assert back == {**headers, "blob": bytearray(b"\x00\xff")}
