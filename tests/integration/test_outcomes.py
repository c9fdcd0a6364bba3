"""One test per outcome of SPEC §1–2, through a real replica, broker, database and provider."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from worker.message import parse_message
from worker.tooling.demo_provider import Rule

from .conftest import Harness, price_change


def key_of(body: dict[str, object]) -> str:
    return parse_message(json.dumps(body).encode(), datetime.now(UTC)).idempotency_key


async def test_2xx_is_recorded_sent(harness: Harness) -> None:
    await harness.start()
    body = price_change(text="AAPL crossed 189")
    await harness.publish(body)
    await harness.wait_finished(1)

    row = await harness.delivery(key_of(body))
    assert (row.status, row.attempts, row.provider_status) == ("sent", 1, 200)
    assert row.provider_message_id == harness.provider.accepted[key_of(body)]
    assert row.sent_at is not None
    assert [r.key for r in harness.provider.requests] == [key_of(body)]


async def test_409_is_recorded_as_a_duplicate_send(harness: Harness) -> None:
    body = price_change()
    # The provider accepted this key before (e.g. a send whose answer was lost).
    harness.provider.set_rules([Rule(drop=True, times=1)])
    await harness.start()
    await harness.publish(body)
    await harness.wait_finished(1)

    row = await harness.delivery(key_of(body))
    assert (row.status, row.provider_status, row.attempts) == ("sent", 409, 2)
    assert [(r.status, r.dropped) for r in harness.provider.requests] == [(200, True), (409, False)]
    assert row.provider_message_id == harness.provider.accepted[key_of(body)]


async def test_429_waits_at_least_retry_after(harness: Harness) -> None:
    harness.provider.set_rules([Rule(status=429, retry_after=2, times=1)])
    await harness.start()
    body = price_change()
    await harness.publish(body)
    await harness.wait_finished(1)

    first, second = harness.provider.requests
    assert first.status == 429
    assert second.status == 200
    assert second.at - first.at >= 2.0
    assert (await harness.delivery(key_of(body))).status == "sent"


async def test_5xx_is_retried_with_falling_priority_then_sent(harness: Harness) -> None:
    harness.provider.set_rules([Rule(status=500, times=2)])
    settings = await harness.start()
    spy = await (await harness.channel()).declare_queue(exclusive=True)
    await spy.bind(harness.names.retry, routing_key="#")
    body = price_change()
    await harness.publish(body)
    await harness.wait_finished(1)

    assert [r.status for r in harness.provider.requests] == [500, 500, 200]
    row = await harness.delivery(key_of(body))
    assert (row.status, row.attempts) == ("sent", 3)
    retries = []
    while (message := await spy.get(fail=False)) is not None:
        retries.append((message.priority, (message.headers or {})["x-attempt"]))
        await message.ack()
    top = settings.max_priority
    # The second failure in a row is the partition's, not the message's: that retry is parked
    # in PostgreSQL for its backoff instead (tests/integration/test_partitions.py), and
    # released at its attempt's priority.
    assert retries == [(top - 1, 1)]


async def test_timeout_is_retried_and_the_late_acceptance_recorded(harness: Harness) -> None:
    harness.provider.latency_ms = 2000
    await harness.start(provider_timeout_seconds=0.5)
    body = price_change()
    await harness.publish(body)

    await harness.wait_for_requests(1, what="the first provider request")
    harness.provider.latency_ms = 0  # the provider recovers; it did accept the first call
    await harness.wait_finished(1)

    assert [r.status for r in harness.provider.requests] == [200, 409]
    row = await harness.delivery(key_of(body))
    assert (row.status, row.provider_status, row.attempts) == ("sent", 409, 2)


async def test_exhausted_after_max_attempts(harness: Harness) -> None:
    harness.provider.set_rules([Rule(channel="email", audience="b", status=503)])
    await harness.start(max_attempts=3)
    body = price_change(audience="b")
    await harness.publish(body)
    await harness.wait_finished(1)

    assert [r.status for r in harness.provider.requests] == [503, 503, 503]
    (dead,) = await harness.rows("SELECT * FROM dead_letters")
    assert (dead.reason, dead.attempts, dead.idempotency_key) == ("exhausted", 3, key_of(body))
    assert "503" in dead.last_error
    assert (await harness.delivery(key_of(body))).status == "dead"


async def test_a_second_chain_shares_the_attempts_of_the_first(harness: Harness) -> None:
    """A copy requeued after its retry was published (its ack lost with the channel) carries
    fewer attempts than the key has used: it continues from the record, not from its header,
    so the two chains together make no more than WORKER_MAX_ATTEMPTS calls."""
    harness.provider.set_rules([Rule(channel="email", audience="b", status=503)])
    await harness.start(max_attempts=2, breaker_failures=0, backoff_base_seconds=30)
    body = price_change(audience="b")
    await harness.publish(body)
    await harness.wait_for(_attempt_recorded(harness, key_of(body)), what="the first attempt")
    # the original, requeued beside its retry (waiting 30 s in the delay backend)
    await harness.publish_to_work_queue(body, attempt=0, priority=5)
    await harness.wait_finished(1)

    assert [r.status for r in harness.provider.requests] == [503, 503]
    (dead,) = await harness.rows("SELECT * FROM dead_letters")
    assert (dead.reason, dead.attempts) == ("exhausted", 2)


def _attempt_recorded(harness: Harness, key: str) -> Callable[[], Awaitable[bool]]:
    async def recorded() -> bool:
        rows = await harness.rows(
            "SELECT attempts FROM deliveries WHERE idempotency_key = :k", k=key
        )
        return bool(rows) and rows[0].attempts == 1

    return recorded


async def test_expired_is_dead_lettered_unsent(harness: Harness) -> None:
    await harness.start(max_age_seconds=3600)
    body = price_change(occurred_at=(datetime.now(UTC) - timedelta(hours=2)).isoformat())
    await harness.publish(body)
    await harness.wait_finished(1)

    (dead,) = await harness.rows("SELECT * FROM dead_letters")
    assert (dead.reason, dead.attempts) == ("expired", 0)
    assert harness.provider.requests == []


async def test_other_4xx_is_rejected_without_retry(harness: Harness) -> None:
    harness.provider.set_rules([Rule(audience="lapsed", status=403)])
    await harness.start()
    body = price_change(audience="lapsed")
    await harness.publish(body)
    await harness.wait_finished(1)

    (dead,) = await harness.rows("SELECT * FROM dead_letters")
    assert (dead.reason, dead.attempts, dead.channel, dead.audience) == (
        "rejected",
        1,
        "email",
        "lapsed",
    )
    assert len(harness.provider.requests) == 1


async def test_403_is_retried_when_configured_retryable(harness: Harness) -> None:
    harness.provider.set_rules([Rule(audience="lapsed", status=403, times=1)])
    await harness.start(retry_statuses="403,500-599")
    body = price_change(audience="lapsed")
    await harness.publish(body)
    await harness.wait_finished(1)

    assert [r.status for r in harness.provider.requests] == [403, 200]
    assert (await harness.delivery(key_of(body))).status == "sent"


async def test_invalid_body_is_dead_lettered_with_its_raw_bytes(harness: Harness) -> None:
    await harness.start(max_body_bytes=4096)
    raw = b'\xff\xfe{"ticker": not json'
    oversized = json.dumps(price_change(text="x" * 900, padding="y" * 5000)).encode()
    await harness.publish(raw)
    await harness.publish(b"[1, 2")
    await harness.publish(price_change(price="-1"))
    await harness.publish(json.dumps(price_change()).encode(), content_type="text/plain")
    await harness.publish(oversized)
    await harness.wait_finished(5)

    dead = await harness.rows("SELECT * FROM dead_letters ORDER BY id")
    assert [d.reason for d in dead] == ["invalid"] * 5
    assert all(d.idempotency_key is None for d in dead)
    by_body = {bytes(d.payload): d.last_error for d in dead}
    assert "not UTF-8" in by_body[raw]
    assert "not JSON" in by_body[b"[1, 2"]
    assert "exceeds the limit" in by_body[oversized]
    assert any("price" in error for error in by_body.values())
    assert any("content type" in error for error in by_body.values())
    assert harness.provider.requests == []


async def test_stale_message_is_superseded(harness: Harness) -> None:
    await harness.start()
    now = datetime.now(UTC)
    newer = price_change(price="190", occurred_at=now.isoformat())
    older = price_change(price="189", occurred_at=(now - timedelta(seconds=30)).isoformat())
    await harness.publish(newer)
    await harness.wait_finished(1)
    await harness.publish(older)
    await harness.wait_finished(2)

    assert (await harness.delivery(key_of(older))).status == "superseded"
    assert [r.key for r in harness.provider.requests] == [key_of(newer)]
    (mark,) = await harness.rows("SELECT * FROM topic_watermarks")
    assert mark.occurred_at == now
    assert mark.lease_token is None


async def test_superseded_after_a_lost_answer_says_it_may_have_been_delivered(
    harness: Harness,
) -> None:
    older = price_change(price="189")
    newer = price_change(price="190", occurred_at=datetime.now(UTC).isoformat())
    # The older one's answer is lost, and its retry waits 1 s: the newer one goes first.
    harness.provider.set_rules([Rule(drop=True, times=1)])
    await harness.start(backoff_base_seconds=1)
    await harness.publish(older)

    await harness.wait_for_requests(1, what="the dropped send")
    await harness.publish(newer)
    await harness.wait_finished(2)

    row = await harness.delivery(key_of(older))
    assert row.status == "superseded"
    assert "may have been delivered" in row.last_error
    assert [r.key for r in harness.provider.requests] == [key_of(older), key_of(newer)]


def newer_and_older() -> tuple[dict[str, Any], dict[str, Any]]:
    """Two prices of one topic, the older 5 s before the newer."""
    now = datetime.now(UTC)
    newer = price_change(price="190", occurred_at=now.isoformat())
    older = price_change(price="189", occurred_at=(now - timedelta(seconds=5)).isoformat())
    return newer, older


async def test_older_message_is_not_sent_after_a_newer_one_whose_answer_was_lost(
    harness: Harness,
) -> None:
    newer, older = newer_and_older()
    # The provider accepts the newer one but its answer is lost: it may have been delivered.
    harness.provider.set_rules([Rule(drop=True, times=1)])
    await harness.start(backoff_base_seconds=2)
    await harness.publish(newer)

    await harness.wait_for_requests(1, what="the dropped send")
    await harness.publish(older)  # arrives while the newer one waits for its retry
    await harness.wait_finished(2)

    assert (await harness.delivery(key_of(older))).status == "superseded"
    assert [(r.key, r.status) for r in harness.provider.requests] == [
        (key_of(newer), 200),
        (key_of(newer), 409),
    ]


async def test_older_message_is_not_sent_after_a_crashed_send_of_a_newer_one(
    harness: Harness,
) -> None:
    newer, older = newer_and_older()
    now = datetime.fromisoformat(newer["occurred_at"])
    topic = "AAPL|email|premium"
    # A replica took the topic lease for the newer message and died mid-send.
    async with harness.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO topic_watermarks (topic_key, lease_token, lease_until,"
                " lease_occurred_at, version)"
                " VALUES (:topic, gen_random_uuid(), now() - interval '1 second', :at, 1)"
            ),
            {"topic": topic, "at": now},
        )
    await harness.start()
    await harness.publish(older)
    await harness.wait_finished(1)
    assert (await harness.delivery(key_of(older))).status == "superseded"

    await harness.publish(newer)  # the crashed replica's message, redelivered
    await harness.wait_finished(2)
    assert (await harness.delivery(key_of(newer))).status == "sent"
    assert [r.key for r in harness.provider.requests] == [key_of(newer)]


async def test_the_same_message_delivered_twice_is_sent_once(harness: Harness) -> None:
    await harness.start(concurrency=8)
    body = price_change()
    for _ in range(5):
        await harness.publish(body)
    await harness.wait_for(
        lambda: _ingress_and_work_empty(harness), timeout=20, what="both queues drained"
    )

    assert [r.key for r in harness.provider.requests] == [key_of(body)]
    assert (await harness.delivery(key_of(body))).status == "sent"


async def _ingress_and_work_empty(harness: Harness) -> bool:
    channel = await harness.channel()
    for name in (harness.names.ingress, harness.names.queue):
        queue = await channel.declare_queue(name, passive=True)
        if queue.declaration_result.message_count:
            return False
    rows = await harness.rows("SELECT count(*) AS n FROM deliveries WHERE status = 'pending'")
    return rows[0].n == 0 and len(harness.provider.requests) >= 1
