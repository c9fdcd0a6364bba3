"""The raw asyncpg path of the batched statements: one pool connection kept per batcher lane.

A batcher has one statement in flight at a time, so it keeps one connection of the engine's
pool for itself and runs its statement on the asyncpg connection underneath, without a pool
checkout and SQLAlchemy's execution layer around every call (measured here: about 100 µs of
CPU per statement instead of about 500). Errors come out as SQLAlchemy's, as from any other
statement of the store, with the SQLSTATE in ``orig``; what each means is
:mod:`worker.db_errors`' to say. After an outage-kind error the connection is dropped and the
next call takes a new one; after the refusal of one statement (its data, a lost race) it is kept.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker import db_errors
from worker.db_errors import DbErrorKind

_TRANSLATED: dict[DbErrorKind, type[DBAPIError]] = {
    DbErrorKind.DATA: DataError,
    DbErrorKind.STATEMENT: ProgrammingError,
    DbErrorKind.RETRY: OperationalError,
    DbErrorKind.OUTAGE: OperationalError,
}
# The batched statements find every row by its key. On a table the planner has no statistics
# for yet (new, or growing fast) it prefers hash joins over sequential scans, a scan of the
# whole table per batch: measured here, PostgreSQL at 1.5 cores for 330 messages a second.
# These connections run nothing else, so they plan key lookups only. And they plan each
# statement once: PostgreSQL would otherwise plan a prepared statement anew at every execution
# for as long as it judges custom plans worth it (measured here, the server's CPU for a 4-row
# claim and mark-sent pair: 1,070-1,340 µs, 690-870 µs with the one generic plan, every lookup
# in it an index scan; in steady_drain, PostgreSQL's CPU per message about a tenth lower).
_PLANNING = (
    "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off;"
    " SET plan_cache_mode = force_generic_plan"
)
# Refusals asyncpg makes before a statement leaves: the connection is closed, or the server's
# FATAL (pg_terminate_backend, a restart) was read while it was idle and its loss not yet.
_NOT_SENT = (asyncpg.InterfaceError, asyncpg.InternalClientError)


def translate(error: BaseException, statement: str) -> DBAPIError:
    kind = _TRANSLATED[db_errors.classify(error)]
    return kind(statement, None, error)


class BatchConnection:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._driver: Any = None  # asyncpg.Connection

    async def fetch(self, statement: str, *args: object) -> list[Any]:
        """Run ``statement`` ($1, $2, … parameters); its rows (asyncpg records).

        A statement PostgreSQL aborted to break a deadlock (or a serialisation failure) changed
        nothing and is run again: two replicas' batches can deadlock, despite their sorted
        rows, on rows of two tables.
        """
        return await db_errors.retrying(lambda: self._fetch(statement, args))

    async def _fetch(self, statement: str, args: tuple[object, ...]) -> list[Any]:
        try:
            return await self._fetch_once(statement, args)
        except _NOT_SENT:
            # The connection died while idle (the database restarted, or cut its sessions):
            # asyncpg refused before sending anything. Once more, on a new connection.
            await self._drop()
        try:
            return await self._fetch_once(statement, args)
        except _NOT_SENT as exc:
            await self._drop()
            raise translate(exc, statement) from exc

    async def _fetch_once(self, statement: str, args: tuple[object, ...]) -> list[Any]:
        if self._connection is None:
            self._connection = await self._engine.connect()  # raises SQLAlchemy's errors
        try:
            if self._driver is None:
                driver: Any = (await self._connection.get_raw_connection()).driver_connection
                await driver.execute(_PLANNING)
                self._driver = driver
            return list(await self._driver.fetch(statement, *args))
        except _NOT_SENT:
            raise
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            if not db_errors.keeps_connection(exc):
                await self._drop()
            raise translate(exc, statement) from exc

    async def _drop(self) -> None:
        connection, self._connection, self._driver = self._connection, None, None
        if connection is not None:
            await connection.invalidate()
            await connection.close()

    async def close(self) -> None:
        """Discard the connection rather than give it back: it carries the settings above."""
        await self._drop()
