"""Issue 10: poison input reaches a real replica, mixed into ordinary messages.

Every case ends (sent, superseded or dead-lettered with its exact bytes) within a bounded
time and alone: every ordinary message is accepted exactly once, no key is sent to the
provider more than WORKER_MAX_ATTEMPTS times, the database gate never closes, and the replica
returns no more than a handful of messages to the queue. One case the edges cannot sanitise
(a row the test's database refuses by a CHECK constraint, in the batched claim statement) shows
the batch bisected: its neighbours carry on, and the offender is dead-lettered on its own.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aio_pika
import pytest
from sqlalchemy import text

from worker.message import parse_message
from worker.tooling.demo_provider import Rule

from .conftest import Fleet, Published, batch

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MAX_ATTEMPTS = 3
FINISH_WITHIN_SECONDS = 120


def fields(ticker: str, **changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "ticker": ticker,
        "price": "10.5",
        "occurred_at": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
        "channel": "email",
        "audience": "a",
    }
    message.update(changes)
    return {k: v for k, v in message.items() if v is not None}


def encoded(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def valid(data: dict[str, Any]) -> Published:
    body = encoded(data)
    parsed = parse_message(body, datetime.now(UTC))
    return Published(body, key=parsed.idempotency_key, topic=parsed.topic_key)


# Bodies that are invalid: each must be dead-lettered `invalid` once with its exact bytes.
INVALID_BODIES: dict[str, bytes] = {
    "NUL in text": encoded(fields("P1", text="a\u0000b")),
    "lone surrogate in text": encoded(fields("P2", text="\ud800")),
    "NUL in an unknown field": encoded(fields("P3", note="x\u0000")),
    "surrogate in an unknown field's name": encoded(fields("P4", **{"\udfff": 1})),
    "deep nesting": b"[" * 5000,
    "deep object": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "0001-01-01T00:00:00+01:00": encoded(fields("P5", occurred_at="0001-01-01T00:00:00+01:00")),
    "9999-12-31T23:59:59-01:00": encoded(fields("P6", occurred_at="9999-12-31T23:59:59-01:00")),
    "huge integer field": encoded(fields("P7")).replace(b"}", b', "n": ' + b"9" * 5000 + b"}"),
}

# Hostile headers, as a Java client or a careless publisher sends them.
POISON_HEADERS: dict[str, Any] = {
    "bytes": bytearray(b"\x00\xff\xfe binary"),  # a byte array (Java's byte[])
    # (a NaN or infinite float header never gets this far: RabbitMQ closes the publisher's
    # connection with INTERNAL_ERROR; the header readers' property tests cover them)
    "float": 1.5e38,
    "huge": 2**63 - 1,
    "nul": "a\u0000b",
    "decimal": Decimal("1.5"),
    "nested": {"deeper": [bytearray(b"\x00"), "\u0000", -(2**63)]},
    "x-attempt": 2**31,
    "x-first-seen-at": "0001-01-01T00:00:00+01:00",
    "x-ignore-max-age": 1,
    "x-replayed-from": 1,
}


async def publish_with_headers(
    fleet: Fleet, items: list[Published], headers: dict[str, Any]
) -> None:
    channel = await fleet.channel()
    exchange = await channel.get_exchange(fleet.source_exchange)
    for item in items:
        await exchange.publish(
            aio_pika.Message(
                item.body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers,
            ),
            routing_key="prices.poison\u0000key",
        )
    fleet.published.extend(items)


async def test_poison_messages_end_once_and_alone(fleet: Fleet) -> None:
    # The test's own database refuses one row of the batched claim statement (23514): an
    # error no sanitising at the edge can prevent, so that the batch itself must isolate it.
    async with fleet.engine.begin() as conn:
        await conn.execute(
            text(
                "ALTER TABLE deliveries ADD CONSTRAINT poison_check"
                " CHECK (payload->>'text' IS DISTINCT FROM 'refused by the database')"
            )
        )
        # and one single statement (an expired message's dead letter): before, such an error
        # closed the database gate, which reopened at once, and the message looped unpaused
        await conn.execute(
            text(
                "ALTER TABLE dead_letters ADD CONSTRAINT poison_check CHECK"
                " (reason <> 'expired' OR position('\\x7265667573656421'::bytea in payload) = 0)"
            )
        )
    fleet.provider.set_rules(
        [
            Rule(audience="binary", status=500, body="binary"),
            Rule(audience="huge", status=503, body="huge"),
            Rule(audience="binary-rejected", status=400, body="binary"),
            Rule(audience="nul-id", nul_id=True),
        ]
    )
    await fleet.start(1, WORKER_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    started = time.monotonic()

    ordinary = [*batch(60, "PRE"), *batch(60, "MID"), *batch(60, "POST")]
    provider_cases = {
        "binary error body": valid(fields("PB", audience="binary")),
        "10 MB error page": valid(fields("PH", audience="huge")),
        "binary rejection": valid(fields("PR", audience="binary-rejected")),
        "NUL id": valid(fields("PN", audience="nul-id")),
    }
    header_cases = {
        "hostile headers, sendable": valid(fields("HS")),
        "hostile headers, expired": valid(
            fields("HE", occurred_at=(datetime.now(UTC) - timedelta(days=3)).isoformat())
        ),
        "hostile headers, rejected": valid(fields("HR", audience="binary-rejected")),
    }
    refused = Published(encoded(fields("DBX", text="refused by the database")))  # no row kept
    refused_single = valid(
        fields(
            "DBY",
            text="refused!",
            occurred_at=(datetime.now(UTC) - timedelta(days=3)).isoformat(),
        )
    )
    invalid = [Published(body) for body in INVALID_BODIES.values()]

    await fleet.publish(ordinary[:60])
    await fleet.publish([*invalid, *provider_cases.values(), refused, refused_single])
    await publish_with_headers(fleet, list(header_cases.values()), POISON_HEADERS)
    await fleet.publish(ordinary[60:])
    await fleet.wait_finished(timeout=FINISH_WITHIN_SECONDS)
    elapsed = time.monotonic() - started

    # every invalid body once, byte-exact
    rows = await fleet.rows(
        "SELECT payload, last_error, sanitised FROM dead_letters WHERE reason = 'invalid'"
    )
    recorded = Counter(bytes(row.payload) for row in rows)
    for what, body in INVALID_BODIES.items():
        assert recorded[body] == 1, f"{what}: {recorded[body]} dead letters"
    assert recorded[refused.body] == 1, "the row the database refused was not finished alone"
    refused_row = next(row for row in rows if bytes(row.payload) == refused.body)
    assert "23514" in refused_row.last_error
    single = await fleet.rows(
        "SELECT reason, last_error FROM dead_letters WHERE idempotency_key = :key",
        key=refused_single.key,
    )
    assert [row.reason for row in single] == ["invalid"]
    assert "23514" in single[0].last_error

    status = {
        row.idempotency_key: row
        for row in await fleet.rows(
            "SELECT idempotency_key, status, attempts, provider_message_id FROM deliveries"
        )
    }
    # the provider's ugly answers
    assert status[provider_cases["binary error body"].key].status == "dead"
    assert status[provider_cases["10 MB error page"].key].status == "dead"
    assert status[provider_cases["binary rejection"].key].status == "dead"
    nul_id = status[provider_cases["NUL id"].key]
    assert nul_id.status == "sent"
    assert "\x00" not in nul_id.provider_message_id
    assert "\ufffd" in nul_id.provider_message_id
    dead = {
        row.idempotency_key: row
        for row in await fleet.rows(
            "SELECT idempotency_key, reason, last_error, headers, routing_key, sanitised,"
            " attempts FROM dead_letters WHERE idempotency_key IS NOT NULL"
        )
    }
    assert dead[provider_cases["binary error body"].key].reason == "exhausted"
    assert dead[provider_cases["10 MB error page"].key].reason == "exhausted"
    assert len(dead[provider_cases["10 MB error page"].key].last_error) < 1000
    assert dead[provider_cases["binary rejection"].key].reason == "rejected"

    # hostile headers: a fresh publish's x-attempt and x-ignore-max-age count for nothing
    assert status[header_cases["hostile headers, sendable"].key].status == "sent"
    assert status[header_cases["hostile headers, sendable"].key].attempts == 1
    expired = dead[header_cases["hostile headers, expired"].key]
    assert expired.reason == "expired", "x-ignore-max-age from a publisher was honoured"
    assert expired.attempts == 0
    assert "headers" in expired.sanitised
    assert "routing_key" in expired.sanitised
    assert "x-ignore-max-age" not in expired.headers
    assert expired.headers["nul"] == "a\ufffdb"
    assert expired.headers["bytes"].endswith(" binary")
    rejected = dead[header_cases["hostile headers, rejected"].key]
    assert rejected.reason == "rejected"
    assert "last_error" in (rejected.sanitised or "")

    # alone and bounded: ordinary messages accepted exactly once, no key over the attempts
    requests = fleet.provider.requests
    accepted = Counter(r.key for r in requests if 200 <= r.status < 300)
    for item in ordinary:
        assert accepted[str(item.key)] == 1, "an ordinary message was not accepted exactly once"
    per_key = Counter(r.key for r in requests)
    assert max(per_key.values()) <= MAX_ATTEMPTS
    assert len(fleet.events("returned_to_queue")) <= 3
    assert fleet.events("database_unavailable") == [], "a data error was taken for an outage"
    fleet.replicas[0].check_alive()
    figures = await fleet.verify()
    fleet.report(
        figures,
        invalid_bodies=len(INVALID_BODIES) + 1,
        finished_s=round(elapsed, 1),
        returned_to_queue=len(fleet.events("returned_to_queue")),
    )
