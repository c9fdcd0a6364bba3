"""The store against the real PostgreSQL: one row's bad data fails no other row of its batch,
hostile values are made storable and say so, and a redelivered invalid body is recognised by
its delivery, not by its bytes alone."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from worker import db_errors
from worker.message import parse_message
from worker.persistence import DeliveryStore, RawMessage, create_engine

NOW = datetime.now(UTC)
DEEP: object = 1
for _ in range(40):
    DEEP = [DEEP]


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[DeliveryStore]:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+asyncpg://"), 8)
    store = DeliveryStore(engine, lease_seconds=25)
    yield store
    await store.close()
    await engine.dispose()


def _message(ticker: str, text_field: str | None = None) -> object:
    body = {
        "ticker": ticker,
        "price": "1.5",
        "occurred_at": (NOW - timedelta(seconds=5)).isoformat(),
        "channel": "email",
        "audience": "a",
    }
    if text_field is not None:
        body["text"] = text_field
    return parse_message(json.dumps(body).encode(), NOW)


async def test_one_bad_row_fails_only_its_own_caller(store: DeliveryStore) -> None:
    async with store.engine.connect() as conn:
        await conn.execute(
            text(
                "ALTER TABLE deliveries ADD CONSTRAINT poison"
                " CHECK (payload->>'text' IS DISTINCT FROM 'poison')"
            )
        )
    messages = [_message(f"T{n}", "poison" if n == 7 else None) for n in range(20)]
    results = await asyncio.gather(
        *(store.claim(m, 0, NOW, uuid.uuid4()) for m in messages),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    failed = [n for n, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [7]
    assert db_errors.is_data_error(results[7])  # type: ignore[arg-type]
    assert db_errors.sqlstate(results[7]) == "23514"  # type: ignore[arg-type]

    # a NUL in a provider id, had it not been sanitised at the edge: 22021, its row alone
    sends = await asyncio.gather(
        *(
            store.mark_sent(m, uuid.uuid4(), 1, 200, "id\x00" if n == 3 else f"id-{n}")  # type: ignore[arg-type]
            for n, m in enumerate(messages)
            if n != 7
        ),
        return_exceptions=True,
    )
    failed = [n for n, r in enumerate(sends) if isinstance(r, BaseException)]
    assert failed == [3]
    assert db_errors.is_data_error(sends[3])  # type: ignore[arg-type]
    rows = await store._execute(
        text("SELECT count(*) AS n FROM deliveries WHERE status = 'sent'"), {}
    )
    assert rows[0].n == 18


def _raw(body: bytes, **changes: object) -> RawMessage:
    fields: dict[str, object] = {
        "body": body,
        "content_type": "application/json",
        "routing_key": "prices.x",
        "headers": {},
        "first_seen_at": NOW,
    }
    fields.update(changes)
    return RawMessage(**fields)  # type: ignore[arg-type]


async def test_a_redelivered_invalid_body_is_matched_by_its_delivery(store: DeliveryStore) -> None:
    body = b"\xff not json"
    first = _raw(body, message_id="m-1")
    assert await store.dead_letter_invalid(first, "not UTF-8", 0) is not None
    # the broker redelivers the same publish: nothing more
    again = _raw(body, message_id="m-1", redelivered=True)
    assert await store.dead_letter_invalid(again, "not UTF-8", 0) is None
    # a second publish of the same bytes (its own message id), redelivered: its own row
    other = _raw(body, message_id="m-2", redelivered=True)
    assert await store.dead_letter_invalid(other, "not UTF-8", 0) is not None
    rows = await store._execute(text("SELECT count(*) AS n FROM dead_letters"), {})
    assert rows[0].n == 2
    # the lookup is by an index, not a scan of every invalid body's bytes
    indexes = await store._execute(
        text("SELECT indexdef FROM pg_indexes WHERE tablename = 'dead_letters'"), {}
    )
    assert any("(delivery_hash)" in row.indexdef for row in indexes)


async def test_hostile_values_are_stored_and_marked(store: DeliveryStore) -> None:
    raw = _raw(
        b"{}",
        routing_key="prices.\x00key",
        content_type="application/json\x00",
        headers={
            "bytes": b"\x00\xff",
            "nan": float("nan"),
            "nul": "\x00",
            "surrogate": "\ud800",
            "huge": 2**80,
            "deep": DEEP,
        },
    )
    dead_id = await store.dead_letter_invalid(raw, "error \x00 with \ud800 " + "x" * 5000, 0)
    assert dead_id is not None
    rows = await store._execute(
        text(
            "SELECT payload, routing_key, content_type, headers, last_error, sanitised"
            " FROM dead_letters WHERE id = :id"
        ),
        {"id": dead_id},
    )
    row = rows[0]
    assert bytes(row.payload) == b"{}"
    assert row.routing_key == "prices.\ufffdkey"
    assert row.headers["nan"] == "nan"
    assert row.headers["huge"] == str(2**80)
    assert len(row.last_error) <= 1000
    assert set(row.sanitised.split(",")) >= {"headers", "routing_key", "content_type", "last_error"}
