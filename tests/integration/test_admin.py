"""``worker-admin`` (SPEC §6) on dead letters made by the real worker, broker and database.

The worker makes the dead letters (provider rules for rejected and exhausted, an old message for
expired, a non-JSON body for invalid) and is stopped; the admin then runs in-process through
``run_admin`` with the harness's database and queue in the environment, and once as the real
console script for its exit statuses.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import REGISTRY
from sqlalchemy import Row, text

import worker.admin.replay as replay_module
from worker.admin import run_admin
from worker.envelope import ATTEMPT, FIRST_SEEN_AT, IGNORE_MAX_AGE, LAST_ERROR, REPLAYED_FROM
from worker.tooling.demo_provider import Rule

from .conftest import AMQP_URL, Harness, price_change
from .test_outcomes import key_of

# The worker's settings while it makes dead letters and while it sends replays.
WORKER = {"max_attempts": 2, "max_age_seconds": 3600}
RULES = [Rule(audience="lapsed", status=403), Rule(audience="flaky", status=500)]
INVALID_BODY = b'\xff\xfe{"ticker": not json'


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Admin = Callable[..., Coroutine[Any, Any, Result]]


@pytest.fixture
def admin(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Admin:
    """``await admin("list", "--json")``: worker-admin in-process on the harness's names."""
    return admin_for(harness, monkeypatch)


def admin_for(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Admin:
    """The ``admin`` fixture's function, for the other admin test modules."""
    for name in list(os.environ):
        if name.upper().startswith("WORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WORKER_DATABASE_URL", harness.database_url)
    monkeypatch.setenv("WORKER_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("WORKER_QUEUE", harness.names.queue)

    async def run(*argv: str) -> Result:
        out, err = io.StringIO(), io.StringIO()
        code = await run_admin(list(argv), out=out, err=err)
        return Result(code, out.getvalue(), err.getvalue())

    return run


def old(hours: float = 2) -> str:
    return (datetime.now(UTC) - timedelta(hours=hours)).isoformat()


def standard_bodies() -> dict[str, dict[str, Any] | bytes]:
    """One of each reason, and a second rejected one."""
    return {
        "rejected": price_change(ticker="AAPL", audience="lapsed"),
        "rejected2": price_change(ticker="MSFT", audience="lapsed", channel="sms"),
        "exhausted": price_change(ticker="NVDA", audience="flaky"),
        "expired": price_change(ticker="TSLA", occurred_at=old()),
        "invalid": INVALID_BODY,
    }


async def make_dead_letters(
    harness: Harness, bodies: list[dict[str, Any] | bytes], rules: list[Rule] = RULES
) -> list[Row[Any]]:
    """Run the worker on ``bodies`` until each ended, stop it; the dead letters by id."""
    harness.provider.set_rules(rules)
    await harness.start(**WORKER)
    for body in bodies:
        await harness.publish(body)
    await harness.wait_finished(len(bodies))
    await harness.stop()
    harness.provider.set_rules(())
    return await harness.rows("SELECT * FROM dead_letters ORDER BY id")


async def standard_dead_letters(harness: Harness) -> dict[str, Row[Any]]:
    bodies = standard_bodies()
    rows = await make_dead_letters(harness, list(bodies.values()))
    assert len(rows) == len(bodies)
    by_body = {bytes(row.payload): row for row in rows}
    return {
        name: by_body[body if isinstance(body, bytes) else json.dumps(body).encode()]
        for name, body in bodies.items()
    }


async def work_queue_depth(harness: Harness) -> int:
    channel = await harness.amqp.channel()
    try:
        queue = await channel.declare_queue(harness.names.queue, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def drain_work_queue(harness: Harness) -> list[AbstractIncomingMessage]:
    """Take every message off the work queue (no worker running)."""
    channel = await harness.amqp.channel()
    queue = await channel.declare_queue(harness.names.queue, passive=True)
    messages = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        messages.append(message)
    await channel.close()
    return messages


def replayed_from(messages: list[AbstractIncomingMessage]) -> Counter[int]:
    return Counter(int(str((m.headers or {})[REPLAYED_FROM])) for m in messages)


async def wait_sent(harness: Harness, keys: list[str], timeout: float = 20) -> None:
    async def sent() -> bool:
        rows = await harness.rows(
            "SELECT count(*) AS n FROM deliveries WHERE idempotency_key = ANY(:keys)"
            " AND status = 'sent'",
            keys=keys,
        )
        return int(rows[0].n) == len(keys)

    await harness.wait_for(sent, timeout, what=f"{len(keys)} keys sent")


def outcomes(outcome: str) -> float:
    value = REGISTRY.get_sample_value("notifications_messages_total", {"outcome": outcome})
    return value or 0.0


async def test_list_filters_and_json(harness: Harness, admin: Admin) -> None:
    dead = await standard_dead_letters(harness)

    async def ids(*argv: str) -> list[int]:
        result = await admin("list", "--json", *argv)
        assert result.code == 0, result.err
        return [item["id"] for item in json.loads(result.out)]

    everything = await ids()
    assert everything == sorted((row.id for row in dead.values()), reverse=True)
    result = await admin("list", "--json")
    first = json.loads(result.out)[0]
    assert list(first) == [
        "id",
        "dead_at",
        "reason",
        "idempotency_key",
        "ticker",
        "channel",
        "audience",
        "attempts",
        "replay_count",
        "replayed_at",
        "first_seen_at",
        "content_type",
        "routing_key",
        "last_error",
        "failure_group",
        "fingerprint",
    ]
    assert {item["reason"] for item in json.loads(result.out)} == {
        "invalid",
        "rejected",
        "exhausted",
        "expired",
    }

    rejected = sorted((dead["rejected"].id, dead["rejected2"].id), reverse=True)
    assert await ids("--reason", "rejected") == rejected
    assert sorted(await ids("--reason", "rejected,expired")) == sorted(
        [*rejected, dead["expired"].id]
    )
    assert sorted(await ids("--reason", "rejected", "--reason", "invalid")) == sorted(
        [*rejected, dead["invalid"].id]
    )
    assert await ids("--ticker", "msft") == [dead["rejected2"].id]
    assert await ids("--audience", "lapsed") == rejected
    assert await ids("--channel", "sms") == [dead["rejected2"].id]
    assert await ids("--since", "1h") == everything
    assert await ids("--until", "1h") == []
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert await ids("--since", future) == []
    assert await ids("--until", future.replace("+00:00", "Z")) == everything
    assert await ids("--limit", "2") == everything[:2]
    assert await ids("--replayed") == []
    assert await ids("--not-replayed") == everything

    table = await admin("list", "--limit", "3")
    assert table.code == 0
    header, *lines = table.out.splitlines()
    assert header.split() == [
        "ID",
        "DEAD_AT",
        "REASON",
        "TICKER/CHANNEL/AUDIENCE",
        "ATTEMPTS",
        "REPLAYS",
        "LAST_ERROR",
    ]
    assert len(lines) == 4
    assert lines[-1].startswith("(3 of 5")
    wide = await admin("list", "--reason", "rejected")
    assert "MSFT/sms/lapsed" in wide.out
    assert "AAPL/email/lapsed" in wide.out
    assert "403" in wide.out
    assert (await admin("list", "--reason", "expired", "--until", "2h")).out.strip() == (
        "no dead letters match"
    )


async def test_show_and_stats(harness: Harness, admin: Admin) -> None:
    dead = await standard_dead_letters(harness)
    rejected = dead["rejected"]

    shown = await admin("show", str(rejected.id))
    assert shown.code == 0, shown.err
    assert f"dead letter {rejected.id}" in shown.out
    assert rejected.idempotency_key in shown.out
    assert '  "ticker": "AAPL",' in shown.out  # the payload, pretty-printed
    assert "status                  dead" in shown.out  # the key's deliveries row
    assert "first_seen_at" in shown.out
    # the headers as delivered: none on a first attempt, ours on a retried one
    assert "x-attempt" not in shown.out
    retried = await admin("show", str(dead["exhausted"].id))
    assert FIRST_SEEN_AT in retried.out
    assert ATTEMPT in retried.out

    data = json.loads((await admin("show", str(rejected.id), "--json")).out)
    assert data["payload_json"]["audience"] == "lapsed"
    assert data["delivery"]["status"] == "dead"
    assert data["reason"] == "rejected"
    assert data["attempts"] == 1
    assert data["headers"] == {}

    invalid = await admin("show", str(dead["invalid"].id))
    assert "not UTF-8; escaped: b'\\xff\\xfe{" in invalid.out
    assert INVALID_BODY.hex(" ") in invalid.out
    assert "an invalid body has no idempotency key" in invalid.out
    invalid_json = json.loads((await admin("show", str(dead["invalid"].id), "--json")).out)
    assert invalid_json["payload_json"] is None
    assert invalid_json["delivery"] is None

    missing = await admin("show", "999999")
    assert (missing.code, missing.err) == (1, "worker-admin: no dead letter with id 999999\n")

    stats = json.loads((await admin("stats", "--json")).out)
    assert (stats["total"], stats["replayed"], stats["not_replayed"]) == (5, 0, 5)
    by_reason = {r["reason"]: r for r in stats["by_reason"]}
    assert {reason: r["count"] for reason, r in by_reason.items()} == {
        "exhausted": 1,
        "expired": 1,
        "invalid": 1,
        "rejected": 2,
    }
    assert by_reason["rejected"]["oldest_dead_at"] <= by_reason["rejected"]["newest_dead_at"]
    targets = {(r["channel"], r["audience"]): r["count"] for r in stats["by_channel_audience"]}
    assert targets[("email", "lapsed")] == 1
    assert targets[(None, None)] == 1
    text = await admin("stats")
    assert text.code == 0
    assert text.out.startswith("5 dead letters: 0 replayed, 5 not")
    assert json.loads((await admin("stats", "--json", "--reason", "rejected")).out)["total"] == 2


async def test_replay_by_id_publishes_a_first_attempt(harness: Harness, admin: Admin) -> None:
    dead = await standard_dead_letters(harness)
    row = dead["exhausted"]
    assert (row.attempts, row.headers[ATTEMPT]) == (2, 1)  # it died on its retry
    assert LAST_ERROR in row.headers

    result = await admin("replay", "--id", str(row.id))
    assert (result.code, result.out.strip()) == (0, "replayed 1, skipped 0"), result.err

    (message,) = await drain_work_queue(harness)
    headers = message.headers or {}
    assert message.body == bytes(row.payload)
    assert message.content_type == "application/json"
    assert message.priority == 9  # max_priority - 1: below fresh messages
    assert message.delivery_mode == 2
    assert headers[REPLAYED_FROM] == row.id
    assert ATTEMPT not in headers
    assert LAST_ERROR not in headers
    assert IGNORE_MAX_AGE not in headers
    assert datetime.fromisoformat(str(headers[FIRST_SEEN_AT])) > row.dead_at
    (after,) = await harness.rows("SELECT * FROM dead_letters WHERE id = :i", i=row.id)
    assert after.replayed_at is not None
    assert after.replay_count == 1
    assert (await harness.delivery(row.idempotency_key)).status == "pending"

    # Put it back (the drain took it) the way the admin would, then let the worker send it.
    result = await admin("replay", "--id", str(row.id), "--priority", "3")
    assert result.code == 0
    await harness.start(**WORKER)
    await wait_sent(harness, [row.idempotency_key])
    assert [r.key for r in harness.provider.requests][-1] == row.idempotency_key
    (after,) = await harness.rows("SELECT * FROM dead_letters WHERE id = :i", i=row.id)
    assert after.replay_count == 2
    assert (await harness.rows("SELECT count(*) AS n FROM dead_letters"))[0].n == 5


async def test_replay_by_reason_while_the_worker_runs(harness: Harness, admin: Admin) -> None:
    bodies = [price_change(ticker=f"R{i}", audience="lapsed") for i in range(20)]
    rows = await make_dead_letters(harness, [*bodies, price_change(audience="flaky")])
    keys = [key_of(body) for body in bodies]
    assert sorted(r.idempotency_key for r in rows if r.reason == "rejected") == sorted(keys)
    await harness.start(**WORKER)  # running while the replay publishes, rules cleared

    result = await admin("replay", "--reason", "rejected", "--batch", "7")
    assert (result.code, result.out.strip()) == (0, "replayed 20, skipped 0"), result.err
    await wait_sent(harness, keys)

    # Exactly the rejected ones were replayed; the exhausted one is untouched.
    states = await harness.rows("SELECT reason, replay_count FROM dead_letters")
    assert {(s.reason, s.replay_count) for s in states} == {("rejected", 1), ("exhausted", 0)}
    assert Counter(r.key for r in harness.provider.requests if r.status == 200) == Counter(keys)


async def test_dry_run_changes_and_publishes_nothing(harness: Harness, admin: Admin) -> None:
    dead = await standard_dead_letters(harness)
    before = await harness.rows("SELECT * FROM dead_letters ORDER BY id")

    result = await admin("replay", "--all", "--dry-run")
    assert result.code == 0, result.err
    *table, summary = result.out.strip().splitlines()
    assert summary == (
        "would replay 3, would skip 2 (expired 1, invalid 1: use --force);"
        " dry run: nothing published, nothing changed"
    )
    listed = {int(line.split()[0]) for line in table[1:]}
    assert listed == {dead[name].id for name in ("rejected", "rejected2", "exhausted")}

    forced = await admin("replay", "--reason", "expired", "--force", "--dry-run")
    assert forced.out.strip().splitlines()[-1].startswith("would replay 1, would skip 0;")

    assert await work_queue_depth(harness) == 0
    assert await harness.rows("SELECT * FROM dead_letters ORDER BY id") == before
    statuses = await harness.rows("SELECT DISTINCT status FROM deliveries")
    assert [s.status for s in statuses] == ["dead"]


async def test_expired_needs_force_and_is_then_sent(harness: Harness, admin: Admin) -> None:
    dead = await standard_dead_letters(harness)
    expired = dead["expired"]

    skipped = await admin("replay", "--reason", "expired,invalid")
    assert (skipped.code, skipped.out.strip()) == (
        0,
        "replayed 0, skipped 2 (expired 1, invalid 1: use --force)",
    )
    by_id = await admin("replay", "--id", str(expired.id))
    assert by_id.out.strip() == "replayed 0, skipped 1 (expired: use --force)"
    assert await work_queue_depth(harness) == 0

    forced = await admin("replay", "--reason", "expired", "--force")
    assert forced.out.strip() == "replayed 1, skipped 0"
    await harness.start(**WORKER)  # max age one hour; the message is two hours old
    await wait_sent(harness, [expired.idempotency_key])
    assert harness.provider.requests[-1].key == expired.idempotency_key
    assert (await harness.rows("SELECT count(*) AS n FROM dead_letters"))[0].n == 5


async def test_replaying_twice_sends_nothing_twice(harness: Harness, admin: Admin) -> None:
    (row,) = await make_dead_letters(harness, [price_change(audience="lapsed")])
    assert (await admin("replay", "--reason", "rejected")).out.strip() == "replayed 1, skipped 0"
    await harness.start(**WORKER)
    await wait_sent(harness, [row.idempotency_key])
    await harness.stop()
    requests = harness.provider.requests
    assert [r.status for r in requests] == [403, 200]

    # By filter: the row is replayed already, so nothing is selected and nothing published.
    again = await admin("replay", "--reason", "rejected")
    assert again.out.strip() == "replayed 0, skipped 0"
    assert await work_queue_depth(harness) == 0

    # By id: published again on purpose, and the worker finds the key already sent.
    finished = outcomes("already_finished")
    assert (await admin("replay", "--id", str(row.id))).out.strip() == "replayed 1, skipped 0"
    assert (await harness.delivery(row.idempotency_key)).status == "sent"  # not reopened
    await harness.start(**WORKER)
    await harness.wait_for(
        lambda: _outcome_grew("already_finished", finished), what="already_finished"
    )
    assert harness.provider.requests == requests
    assert (await harness.delivery(row.idempotency_key)).status == "sent"


async def _outcome_grew(outcome: str, before: float) -> bool:
    return outcomes(outcome) > before


async def test_replay_of_a_key_sent_meanwhile_is_not_sent_again(
    harness: Harness, admin: Admin
) -> None:
    # Rejected twice: the first dead letter, replayed, dies again as a second one.
    body = price_change(audience="lapsed")
    (first,) = await make_dead_letters(harness, [body], [Rule(audience="lapsed", status=403)])
    harness.provider.set_rules([Rule(audience="lapsed", status=403, times=1)])
    await admin("replay", "--id", str(first.id))
    await harness.start(**WORKER)
    await harness.wait_for(lambda: _dead_letters(harness, 2), what="the replay dead-lettered again")
    # The second is replayed and sent: the key is sent now.
    result = await admin("replay", "--reason", "rejected")
    assert result.out.strip() == "replayed 1, skipped 0"
    await wait_sent(harness, [first.idempotency_key])
    assert [r.status for r in harness.provider.requests] == [403, 403, 200]

    # The first one, replayed again by id, reaches the worker but is not sent again.
    finished = outcomes("already_finished")
    assert (await admin("replay", "--id", str(first.id))).code == 0
    await harness.wait_for(
        lambda: _outcome_grew("already_finished", finished), what="already_finished"
    )
    assert [r.status for r in harness.provider.requests] == [403, 403, 200]
    assert (await harness.delivery(first.idempotency_key)).status == "sent"


async def _dead_letters(harness: Harness, count: int) -> bool:
    return int((await harness.rows("SELECT count(*) AS n FROM dead_letters"))[0].n) >= count


async def test_concurrent_replays_publish_each_row_once(harness: Harness, admin: Admin) -> None:
    bodies = [price_change(ticker=f"C{i}", audience="lapsed") for i in range(200)]
    rows = await make_dead_letters(harness, list(bodies))
    assert len(rows) == 200

    first, second = await asyncio.gather(
        admin("replay", "--all", "--batch", "20"),
        admin("replay", "--reason", "rejected", "--batch", "25"),
    )
    assert first.code == second.code == 0, first.err + second.err
    counts = [int(result.out.split()[1].rstrip(",")) for result in (first, second)]
    assert sum(counts) == 200

    published = replayed_from(await drain_work_queue(harness))
    assert published == Counter({row.id: 1 for row in rows})
    replay_counts = await harness.rows("SELECT DISTINCT replay_count FROM dead_letters")
    assert [r.replay_count for r in replay_counts] == [1]


async def test_unroutable_replay_fails_and_rolls_back(harness: Harness, admin: Admin) -> None:
    rows = await make_dead_letters(harness, [price_change(audience="lapsed")])
    channel = await harness.amqp.channel()
    await channel.queue_delete(harness.names.queue)
    await channel.close()

    result = await admin("replay", "--all")
    assert result.code == 1
    assert result.out == ""
    assert result.err.count("\n") == 1
    assert result.err.startswith("worker-admin: the broker returned 1 of 1 messages")
    assert "unroutable" in result.err
    assert repr(harness.names.queue) in result.err
    assert result.err.rstrip().endswith("batch rolled back, 0 replayed before it")
    assert await harness.rows("SELECT * FROM dead_letters ORDER BY id") == rows
    assert (await harness.delivery(rows[0].idempotency_key)).status == "dead"


INTERRUPTED = (
    "worker-admin: interrupted: replayed {n}, every other row untouched;"
    " run the same command again to replay the rest\n"
)


async def _interrupt_the_third_batch(
    harness: Harness, admin: Admin, monkeypatch: pytest.MonkeyPatch, cancels: int, replayed: int
) -> list[Row[Any]]:
    """Replay 30 rows in batches of 5; cancel the command ``cancels`` times while its third
    batch is published but not committed (where Ctrl-C is most likely to land); check that it
    says it was interrupted and that exactly the first ``replayed`` rows are replayed."""
    rows = await make_dead_letters(
        harness, [price_change(ticker=f"I{i}", audience="lapsed") for i in range(30)]
    )
    publish = replay_module._publish
    published, release = asyncio.Event(), asyncio.Event()
    batches = 0

    async def publish_then_wait_on_the_third(*args: Any, **kwargs: Any) -> None:
        nonlocal batches
        await publish(*args, **kwargs)
        batches += 1
        if batches == 3:
            published.set()
            await release.wait()

    monkeypatch.setattr(replay_module, "_publish", publish_then_wait_on_the_third)
    task = asyncio.create_task(admin("replay", "--all", "--batch", "5"))
    await asyncio.wait_for(published.wait(), 10)
    for _ in range(cancels):
        task.cancel()
        await asyncio.sleep(0.1)
    release.set()
    result = await task
    monkeypatch.setattr(replay_module, "_publish", publish)
    assert (result.code, result.err) == (1, INTERRUPTED.format(n=replayed))
    done = await harness.rows("SELECT id FROM dead_letters WHERE replayed_at IS NOT NULL")
    assert sorted(r.id for r in done) == [row.id for row in rows[:replayed]]
    return rows


async def test_ctrl_c_finishes_the_batch_in_progress_and_the_rerun_the_rest(
    harness: Harness, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = await _interrupt_the_third_batch(harness, admin, monkeypatch, cancels=1, replayed=15)
    first = replayed_from(await drain_work_queue(harness))

    rest = await admin("replay", "--all", "--batch", "5")
    assert rest.out.strip() == "replayed 15, skipped 0"
    second = replayed_from(await drain_work_queue(harness))
    # Every row published exactly once over the two runs.
    assert (first, second) == (
        Counter({row.id: 1 for row in rows[:15]}),
        Counter({row.id: 1 for row in rows[15:]}),
    )


async def test_a_second_ctrl_c_aborts_and_the_provider_still_gets_each_key_once(
    harness: Harness, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = await _interrupt_the_third_batch(harness, admin, monkeypatch, cancels=2, replayed=10)
    # The third batch was published but rolled back: its rows are free, and the rerun
    # publishes them a second time (as after a kill between publish and commit).
    rest = await admin("replay", "--all", "--batch", "5")
    assert rest.out.strip() == "replayed 20, skipped 0"
    assert await work_queue_depth(harness) == 35

    before = len(harness.provider.requests)
    await harness.start(**WORKER)
    keys = [row.idempotency_key for row in rows]
    await wait_sent(harness, keys)
    await harness.wait_for(lambda: _work_queue_empty(harness), what="the work queue drained")
    await harness.stop()  # every message taken has finished
    sent = harness.provider.requests[before:]
    assert Counter(r.key for r in sent) == Counter(keys)  # one request per key, no 409 either
    assert {r.status for r in sent} == {200}


async def _work_queue_empty(harness: Harness) -> bool:
    return await work_queue_depth(harness) == 0


async def test_purge(harness: Harness, admin: Admin) -> None:
    dead = await standard_dead_letters(harness)
    async with harness.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE dead_letters SET dead_at = now() - interval '10 days' WHERE id = ANY(:ids)"
            ),
            {"ids": [dead["expired"].id, dead["rejected"].id]},
        )

    refused = await admin("purge", "--before", "7d")
    assert refused.code == 2
    assert refused.err == (
        "worker-admin: would delete 2 dead letters: pass --yes (no terminal to ask)\n"
    )
    purged = await admin("purge", "--before", "7d", "--reason", "expired", "--yes")
    assert purged.code == 0
    assert purged.out.startswith("deleted 1 dead letters")
    assert (await admin("purge", "--before", "30d", "--yes")).out.startswith("deleted 0")
    purged = await admin("purge", "--before", "7d", "--yes")
    assert purged.out.startswith("deleted 1 dead letters")
    remaining = await harness.rows("SELECT id FROM dead_letters ORDER BY id")
    assert {r.id for r in remaining} == {
        dead[name].id for name in ("rejected2", "exhausted", "invalid")
    }
    # The purged rows' keys stay dead: a redelivery of the same message is not sent.
    assert (await harness.delivery(dead["rejected"].idempotency_key)).status == "dead"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["list", "--reason", "lost"], "unknown reason 'lost'"),
        (["list", "--since", "yesterday"], "'yesterday' is neither RFC 3339"),
        (["list", "--since", "2026-01-01T10:00:00"], "needs an offset"),
        (["list", "--since", "1h", "--until", "2h"], "--since must be before --until"),
        (["replay"], "replay what?"),
        (["replay", "--id", "3", "--all"], "--id and --all exclude each other"),
        (["replay", "--all", "--reason", "rejected"], "filters and --all exclude each other"),
        (["replay", "--all", "--priority", "11"], "--priority 11 is outside 0..10"),
        (["replay", "--id", "x"], "'x' is not an id"),
        (["replay", "--group", "56cd96a6a70"], "'56cd96a6a70' is not a failure group"),
        (["list", "--group", "56cd96a6a70g"], "is not a failure group: 12 hex digits"),
        (["replay", "--all", "--rate", "0"], "0: messages per second, more than 0"),
        (["purge"], "the following arguments are required: --before"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
async def test_bad_usage_exits_2_with_one_line(admin: Admin, argv: list[str], says: str) -> None:
    result = await admin(*argv)
    assert result.code == 2
    assert result.err.startswith("worker-admin: ")
    assert result.err.count("\n") == 1
    assert says in result.err
    assert result.out == ""


async def test_failures_exit_1_with_one_line(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = await admin("replay", "--id", "41,42")
    assert (unknown.code, unknown.err) == (
        1,
        "worker-admin: no dead letter with id 41, 42; nothing replayed\n",
    )

    monkeypatch.setenv("WORKER_AMQP_URL", "amqp://guest:hunter2@127.0.0.1:1/")
    broker = await admin("replay", "--all")
    assert broker.code == 1
    assert broker.err.startswith("worker-admin: cannot reach the broker at amqp://guest:***@")
    assert "hunter2" not in broker.err

    monkeypatch.setenv("WORKER_DATABASE_URL", "postgresql://postgres:hunter2@127.0.0.1:1/nw")
    database = await admin("list")
    assert database.code == 1
    assert database.err.startswith("worker-admin: database error at postgresql+asyncpg://")
    assert database.err.count("\n") == 1
    assert "hunter2" not in database.err

    monkeypatch.setenv("WORKER_MAX_PRIORITY", "high")
    config = await admin("stats")
    assert config.code == 2
    assert config.err.startswith("worker-admin: configuration error: WORKER_MAX_PRIORITY")


async def test_console_script_exit_statuses(harness: Harness) -> None:
    script = Path(sys.executable).parent / "worker-admin"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WORKER_")}
    env.update(
        WORKER_DATABASE_URL=harness.database_url,
        WORKER_AMQP_URL=AMQP_URL,
        WORKER_QUEUE=harness.names.queue,
    )

    async def run(*argv: str, **extra: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            str(script),
            *argv,
            env={**env, **extra},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    ok, missing, usage, unreachable = await asyncio.gather(
        run("list", "--json"),
        run("show", "7"),
        run("replay", "--all", "--id", "1"),
        run("stats", WORKER_DATABASE_URL="postgresql://postgres@127.0.0.1:1/nw"),
    )
    assert ok == (0, "[]\n", "")
    assert missing == (1, "", "worker-admin: no dead letter with id 7\n")
    assert usage[0] == 2
    assert usage[2].startswith("worker-admin: --id and --all exclude")
    assert unreachable[0] == 1
    assert unreachable[2].startswith("worker-admin: database error")
    for _, _, err in (missing, usage, unreachable):
        assert err.count("\n") == 1
        assert "Traceback" not in err
