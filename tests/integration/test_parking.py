"""The parking lot on the real database: a key parked again while its earlier row is being
released is kept, never merged away (the bench once lost such messages)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aio_pika
from sqlalchemy import text

from worker.breaker import BreakerConfig
from worker.parking import Parked, ParkingLot, decode_headers, encode_headers
from worker.partitions import PartitionBoard
from worker.persistence import create_engine


def parked(key: str) -> Parked:
    now = datetime.now(UTC)
    return Parked(
        partition="email|b",
        idempotency_key=key,
        attempt=1,
        message=aio_pika.Message(b"{}", headers={"x-attempt": 1}, content_type="application/json"),
        occurred_at=now,
        due_at=now,
        expires_at=now + timedelta(hours=1),
    )


async def test_a_key_parked_again_during_its_release_is_kept(database_url: str) -> None:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+asyncpg://"), 4)
    lot = ParkingLot(
        engine, PartitionBoard(engine, ("channel", "audience"), BreakerConfig(), 25), 10
    )
    try:
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
    finally:
        await lot.close()
        await engine.dispose()


def test_headers_come_back_as_they_were() -> None:
    headers = {"x-attempt": 3, "blob": b"\x00\xff", "nested": {"a": [1, "b"]}, "text": "é\x00"}
    back = decode_headers(encode_headers(headers))
    assert back == {**headers, "blob": bytearray(b"\x00\xff")}
