"""``worker-admin partitions``: the provider's health per partition, and an operator's hand on it.

``partitions`` lists every partition that has a health row or parked messages: state, failures in
a row, trips, parked count, since when it is open. ``partitions hold KEY`` holds one open (the
operator knows the plan lapsed: nothing is sent, nothing probed, everything parks) until
``partitions close KEY`` closes it, which releases its parked messages at once. Both change the
row under its lock, as the replicas do, so they never overwrite a replica's concurrent change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from worker import breaker
from worker.admin.errors import Failure
from worker.admin.render import record, short_time, table, to_json, truncate
from worker.breaker import PartitionHealth
from worker.partitions import log_transition, transition

_LIST = text(
    """
    WITH parked AS (
        SELECT partition_key, count(*) AS parked, min(parked_at) AS oldest
        FROM parked_messages GROUP BY partition_key
    )
    SELECT coalesce(h.partition_key, p.partition_key) AS partition_key,
           coalesce(h.state, 'closed') AS state, coalesce(h.held, false) AS held,
           coalesce(h.consecutive_failures, 0) AS consecutive_failures,
           coalesce(h.trips, 0) AS trips, h.opened_at, h.open_until, h.last_error,
           coalesce(p.parked, 0) AS parked, p.oldest AS oldest_parked, h.changed_at
    FROM partition_health AS h FULL JOIN parked AS p ON p.partition_key = h.partition_key
    ORDER BY (coalesce(h.state, 'closed') = 'closed'), 1
    """
)
KEYS = (
    "partition_key",
    "state",
    "held",
    "consecutive_failures",
    "trips",
    "parked",
    "opened_at",
    "open_until",
    "oldest_parked",
    "changed_at",
    "last_error",
)


async def list_partitions(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(_LIST)).all())


def partitions_table(rows: Sequence[Any]) -> str:
    if not rows:
        return "no partition has failed, none has parked messages"
    headers = ("PARTITION", "STATE", "FAILURES", "TRIPS", "PARKED", "OPEN_SINCE", "LAST_ERROR")
    body = [
        (
            truncate(row.partition_key, 40),
            row.state + (" (held)" if row.held else ""),
            row.consecutive_failures,
            row.trips,
            row.parked,
            short_time(row.opened_at),
            truncate(row.last_error, 50),
        )
        for row in rows
    ]
    return table(headers, body, right={2, 3, 4})


def partitions_json(rows: Sequence[Any]) -> str:
    return to_json([record(row, KEYS) for row in rows])


async def steer(engine: AsyncEngine, action: str, key: str) -> PartitionHealth:
    """``hold`` or ``close`` the partition ``key``; its state afterwards."""
    if not key or len(key) > 500:
        raise Failure("a partition key is 1 to 500 characters, e.g. email|premium")
    change = {
        "hold": lambda health, now: breaker.hold(health, now),
        "close": lambda health, now: breaker.close(health, now),
    }[action]
    transactional = engine.execution_options(isolation_level="READ COMMITTED")
    async with transactional.begin() as conn:
        before, after = await transition(conn, key, change)
    log_transition(before, after, "operator")
    return after
