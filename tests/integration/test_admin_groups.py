"""Failure groups on the real database: the generated column agrees with the Python rules, and
``stats``, ``list --group`` and ``replay --group`` work on dead letters the worker made."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from worker.admin.fingerprint import failure_group, fingerprint
from worker.schema import failure_group_sql
from worker.tooling.demo_provider import Rule

from .conftest import Harness, price_change
from .test_admin import Admin, admin_for, make_dead_letters, wait_sent


@pytest.fixture
def admin(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Admin:
    return admin_for(harness, monkeypatch)


KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
# What the worker writes, what providers answer, and what could trip the two regex engines.
CORPUS = [
    'HTTP 500: {"error": "injected failure 500"}',
    "HTTP 403: plan lapsed for account 12345",
    f"HTTP 400: invalid recipient jane.doe@example.com key {KEY}",
    "timeout",
    "ClientConnectorError: Cannot connect to host 127.0.0.1:8081 ssl:default"
    " [Connect call failed ('127.0.0.1', 8081)]",
    "not UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
    "not JSON: Expecting value: line 1 column 12 (char 11)",
    "HTTP 503: upstream https://api.example.com/v1/notifications/email?id=77&x=y unavailable"
    " at 2026-05-01T10:00:00.123456+02:00 request 123e4567-e89b-12d3-a456-426614174000",
    "HTTP 429: slow down until Tue, 15 Nov 1994 08:12:31 GMT",
    "may have been delivered (HTTP 500: boom 3)",
    "id pi_3MtwBwLkdIwHu7ix28a3tqPa and pi_9QxzAa12bb34Cc56dd78 failed  \n twice",
    "HTTP 5001 deadbeef cafebabe 12345678 abcdef12 1.5 2.0.1 x9 sha256 abcdef12345678xyz",
    "body of 70000 bytes exceeds the limit of 65536",
    "Ünïcode é 42 ü ſ K İ ı",  # letters that case-folding engines treat as ASCII
    "quotes ' \" \\ and a tab\there",
    "",
    "x" * 600 + " 123",
]


async def test_the_generated_column_agrees_with_the_python_rules(harness: Harness) -> None:
    async with harness.engine.begin() as conn:
        for error in [*CORPUS, None]:
            await conn.execute(
                text(
                    "INSERT INTO dead_letters (reason, payload, last_error, first_seen_at)"
                    " VALUES ('invalid', '\\x00', :e, now())"
                ),
                {"e": error},
            )
    rows = await harness.rows(
        "SELECT last_error, failure_group, left(md5(failure_group), 12) AS fp,"
        f" {failure_group_sql('last_error')} AS from_schema"
        " FROM dead_letters ORDER BY id"
    )
    assert len(rows) == len(CORPUS) + 1
    for row in rows:
        expected = failure_group(row.last_error)
        assert (row.failure_group, row.from_schema) == (expected, expected), row.last_error
        assert row.fp == fingerprint(expected)


async def test_the_schema_and_the_migration_define_the_same_column(harness: Harness) -> None:
    async with harness.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TEMP TABLE from_schema (last_error text, failure_group text"
                f" GENERATED ALWAYS AS ({failure_group_sql('last_error')}) STORED)"
            )
        )
        definitions = (
            await conn.execute(
                text(
                    "SELECT c.relname, pg_get_expr(d.adbin, d.adrelid) AS expression"
                    " FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid"
                    " JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
                    " WHERE a.attname = 'failure_group'"
                    " AND c.relname IN ('dead_letters', 'from_schema')"
                )
            )
        ).fetchall()
    expressions = {row.relname: row.expression for row in definitions}
    assert expressions["dead_letters"] == expressions["from_schema"]


def _bodies() -> list[dict[str, Any]]:
    """Three failures: a 500 for email/flaky (exhausted), a 403 lapsed plan (rejected) and a
    422 for sms (rejected), each on messages of different tickers and keys."""
    return [
        *(price_change(ticker=f"F{i}", audience="flaky") for i in range(4)),
        *(price_change(ticker=f"L{i}", audience="lapsed") for i in range(3)),
        *(price_change(ticker=f"S{i}", audience="sms-only", channel="sms") for i in range(2)),
    ]


RULES = [
    Rule(audience="flaky", status=500),
    Rule(audience="lapsed", status=403),
    Rule(audience="sms-only", status=422),
]


async def test_stats_groups_and_replay_by_group(harness: Harness, admin: Admin) -> None:
    rows = await make_dead_letters(harness, list(_bodies()), RULES)
    by_status = {
        status: [r for r in rows if (r.last_error or "").startswith(f"HTTP {status}")]
        for status in (500, 403, 422)
    }
    assert [len(group) for group in by_status.values()] == [4, 3, 2]

    stats = json.loads((await admin("stats", "--json")).out)
    groups = {g["failure_group"].split(":")[0]: g for g in stats["by_failure_group"]}
    assert {name: g["count"] for name, g in groups.items()} == {
        "HTTP 500": 4,
        "HTTP 403": 3,
        "HTTP 422": 2,
    }
    assert groups["HTTP 500"]["reasons"] == ["exhausted"]
    assert groups["HTTP 403"]["reasons"] == ["rejected"]
    for name, group in groups.items():
        assert group["fingerprint"] == fingerprint(group["failure_group"])
        dead_at = sorted(r.dead_at for r in by_status[int(name.split()[1])])
        assert group["oldest_dead_at"] <= group["newest_dead_at"]
        assert group["oldest_dead_at"][:19] == dead_at[0].isoformat()[:19]
    targets = {(t["channel"], t["audience"]): t for t in stats["by_channel_audience"]}
    assert targets[("sms", "sms-only")]["count"] == 2
    assert targets[("email", "flaky")]["oldest_dead_at"] is not None

    table = (await admin("stats")).out
    assert f"{groups['HTTP 403']['fingerprint']}      3" in table
    assert "GROUP" in table
    assert "FAILURE" in table

    lapsed = groups["HTTP 403"]["fingerprint"]
    listed = json.loads((await admin("list", "--json", "--group", lapsed)).out)
    assert sorted(item["id"] for item in listed) == sorted(r.id for r in by_status[403])
    assert {item["fingerprint"] for item in listed} == {lapsed}

    dry = await admin("replay", "--group", lapsed, "--dry-run")
    assert dry.out.strip().splitlines()[-1].startswith("would replay 3, would skip 0;")
    await harness.start(max_attempts=2)  # the provider's rules are cleared: it accepts
    result = await admin("replay", "--group", lapsed)
    assert (result.code, result.out.strip()) == (0, "replayed 3, skipped 0"), result.err
    await wait_sent(harness, [r.idempotency_key for r in by_status[403]])
    states = Counter(
        (r.reason, r.replay_count) for r in await harness.rows("SELECT * FROM dead_letters")
    )
    assert states == Counter({("exhausted", 0): 4, ("rejected", 1): 3, ("rejected", 0): 2})

    both = [groups["HTTP 500"]["fingerprint"], groups["HTTP 422"]["fingerprint"]]
    again = await admin("replay", "--group", ",".join(both), "--group", lapsed)
    assert again.out.strip() == "replayed 6, skipped 0"  # the lapsed ones were replayed already
    unknown = await admin("replay", "--group", "0123456789ab")
    assert (unknown.code, unknown.out.strip()) == (0, "replayed 0, skipped 0")
