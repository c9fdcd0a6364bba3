"""The admin's reads and deletes on ``dead_letters`` (SPEC §5), built with SQLAlchemy Core.

:class:`Filters` is the one description of "which dead letters" that ``list``, ``stats``,
``purge`` and ``replay`` share; :meth:`Filters.clauses` turns it into WHERE clauses on
:data:`worker.schema.dead_letters`. The functions here are single statements on the
autocommit engine; the replay's transaction lives in :mod:`worker.admin.replay`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, false, func, select, true
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.admin.fingerprint import FINGERPRINT
from worker.schema import dead_letters, deliveries

# Reasons a replay leaves alone unless --force: an expired message is to be sent although it is
# older than WORKER_MAX_AGE_SECONDS, an invalid one will most likely be refused again.
FORCE_REASONS = ("expired", "invalid")


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters. Empty tuples and None mean "any"; ``until`` is exclusive."""

    ids: tuple[int, ...] = ()
    reasons: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    tickers: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # failure-group fingerprints
    replayed: bool | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        c = dead_letters.c
        where: list[ColumnElement[bool]] = []
        if self.ids:
            where.append(c.id.in_(self.ids))
        if self.reasons:
            where.append(c.reason.in_(self.reasons))
        if self.since is not None:
            where.append(c.dead_at >= self.since)
        if self.until is not None:
            where.append(c.dead_at < self.until)
        if self.tickers:
            where.append(c.ticker.in_(self.tickers))
        if self.channels:
            where.append(c.channel.in_(self.channels))
        if self.audiences:
            where.append(c.audience.in_(self.audiences))
        if self.groups:
            where.append(FINGERPRINT.in_(self.groups))
        if self.replayed is True:
            where.append(c.replayed_at.is_not(None))
        elif self.replayed is False:
            where.append(c.replayed_at.is_(None))
        return where


def replayable(force: bool) -> ColumnElement[bool]:
    """The rows a replay takes: all with ``--force``, else none of :data:`FORCE_REASONS`."""
    return true() if force else dead_letters.c.reason.not_in(FORCE_REASONS)


def held_back(force: bool) -> ColumnElement[bool]:
    """The rows a replay skips for want of ``--force``."""
    return false() if force else dead_letters.c.reason.in_(FORCE_REASONS)


# Every column but the payload and headers: what a listing shows.
SUMMARY_COLUMNS = (
    dead_letters.c.id,
    dead_letters.c.dead_at,
    dead_letters.c.reason,
    dead_letters.c.idempotency_key,
    dead_letters.c.ticker,
    dead_letters.c.channel,
    dead_letters.c.audience,
    dead_letters.c.attempts,
    dead_letters.c.replay_count,
    dead_letters.c.replayed_at,
    dead_letters.c.first_seen_at,
    dead_letters.c.content_type,
    dead_letters.c.routing_key,
    dead_letters.c.last_error,
    dead_letters.c.failure_group,
    FINGERPRINT.label("fingerprint"),
)


def summary_select(filters: Filters, *extra: ColumnElement[bool]) -> Select[Any]:
    return select(*SUMMARY_COLUMNS).where(*filters.clauses(), *extra)


async def list_rows(
    conn: AsyncConnection, filters: Filters, limit: int | None, newest_first: bool = True
) -> list[Any]:
    order = dead_letters.c.id.desc() if newest_first else dead_letters.c.id.asc()
    statement = summary_select(filters).order_by(order)
    if limit is not None:
        statement = statement.limit(limit)
    return list((await conn.execute(statement)).fetchall())


async def count_rows(conn: AsyncConnection, filters: Filters, *extra: ColumnElement[bool]) -> int:
    statement = select(func.count()).select_from(dead_letters).where(*filters.clauses(), *extra)
    return int((await conn.execute(statement)).scalar_one())


async def counts_by_reason(
    conn: AsyncConnection, filters: Filters, *extra: ColumnElement[bool]
) -> dict[str, int]:
    statement = (
        select(dead_letters.c.reason, func.count())
        .where(*filters.clauses(), *extra)
        .group_by(dead_letters.c.reason)
        .order_by(dead_letters.c.reason)
    )
    return {str(reason): int(n) for reason, n in (await conn.execute(statement)).all()}


async def existing_ids(conn: AsyncConnection, ids: Sequence[int]) -> set[int]:
    statement = select(dead_letters.c.id).where(dead_letters.c.id.in_(ids))
    return {int(i) for i in (await conn.execute(statement)).scalars()}


async def get_row(conn: AsyncConnection, dead_letter_id: int) -> Any | None:
    statement = select(dead_letters, FINGERPRINT.label("fingerprint")).where(
        dead_letters.c.id == dead_letter_id
    )
    return (await conn.execute(statement)).first()


async def get_delivery(conn: AsyncConnection, key: str) -> Any | None:
    c = deliveries.c
    statement = select(
        c.status,
        c.attempts,
        c.first_seen_at,
        c.sent_at,
        c.provider_status,
        c.provider_message_id,
        c.last_error,
        c.updated_at,
    ).where(c.idempotency_key == key)
    return (await conn.execute(statement)).first()


@dataclass(frozen=True, slots=True)
class Stats:
    """Each list holds rows with ``total``, ``replayed``, ``oldest`` and ``newest`` (dead_at)."""

    total: int
    replayed: int
    by_reason: list[Any]  # + reason
    by_group: list[Any]  # + failure_group, fingerprint, reasons (sorted)
    by_channel_audience: list[Any]  # + channel, audience


def _counted(*keys: ColumnElement[Any]) -> Select[Any]:
    """``keys`` with the count, the replayed count, the oldest and the newest of each."""
    c = dead_letters.c
    return select(
        *keys,
        func.count().label("total"),
        func.count(c.replayed_at).label("replayed"),
        func.min(c.dead_at).label("oldest"),
        func.max(c.dead_at).label("newest"),
    )


async def stats(conn: AsyncConnection, filters: Filters) -> Stats:
    c = dead_letters.c
    where = filters.clauses()
    by_reason = (
        await conn.execute(_counted(c.reason).where(*where).group_by(c.reason).order_by(c.reason))
    ).fetchall()
    reasons = func.array_agg(aggregate_order_by(c.reason.distinct(), c.reason))
    by_group = (
        await conn.execute(
            _counted(c.failure_group, FINGERPRINT.label("fingerprint"), reasons.label("reasons"))
            .where(*where)
            .group_by(c.failure_group)
            .order_by(func.count().desc(), c.failure_group)
        )
    ).fetchall()
    by_channel_audience = (
        await conn.execute(
            _counted(c.channel, c.audience)
            .where(*where)
            .group_by(c.channel, c.audience)
            .order_by(func.count().desc(), c.channel, c.audience)
        )
    ).fetchall()
    return Stats(
        total=sum(int(r.total) for r in by_reason),
        replayed=sum(int(r.replayed) for r in by_reason),
        by_reason=list(by_reason),
        by_group=list(by_group),
        by_channel_audience=list(by_channel_audience),
    )


async def purge(engine: AsyncEngine, filters: Filters) -> int:
    """Delete the matching dead letters; their ``deliveries`` rows stay (the key stays dead)."""
    async with engine.connect() as conn:
        result = await conn.execute(delete(dead_letters).where(*filters.clauses()))
        return int(result.rowcount)
