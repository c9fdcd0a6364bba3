"""What a database error means, decided by its SQLSTATE, in one place.

- ``OUTAGE``: the database is unreachable or going away (no SQLSTATE: a socket, a timeout, a
  closed connection; class 08 connection exceptions; 57P01-57P03 shutdown and cannot-connect;
  53 insufficient resources; 58 system errors). The replica closes its database gate and holds
  its messages until PostgreSQL answers again.
- ``DATA``: the database refused this message's data (class 22 data exceptions, 23 integrity
  violations, 54 program limits such as a nesting too deep, or a value the driver could not
  encode: asyncpg reports those as 22000 too). The message is finished on its own, dead-lettered
  ``invalid`` with its text made storable; it never fails the other messages of its batch.
- ``RETRY``: the statement lost a race and changed nothing (40P01 deadlock, 40001 serialisation
  failure): it is run again, after a short pause.
- ``STATEMENT``: the statement itself is wrong (class 42: a bug or a schema that does not match).
  Not an outage and not the message's fault: the message goes back to the queue after a pause.

SQLAlchemy wraps asyncpg's errors (``DBAPIError`` and subclasses, their ``orig`` carrying the
SQLSTATE), and its asyncpg dialect raises ``DBAPIError``/``StatementError`` rather than
``DataError`` for many data errors, so nothing here goes by exception class where a SQLSTATE
is at hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

import asyncpg
from sqlalchemy.exc import DBAPIError, SQLAlchemyError, StatementError

T = TypeVar("T")


class DbErrorKind(StrEnum):
    OUTAGE = "outage"
    DATA = "data"
    RETRY = "retry"
    STATEMENT = "statement"


DEADLOCK = "40P01"
SERIALIZATION_FAILURE = "40001"
_RETRY_STATES = frozenset({DEADLOCK, SERIALIZATION_FAILURE})
_DATA_CLASSES = frozenset({"22", "23", "54"})
_OUTAGE_CLASSES = frozenset({"08", "53", "57", "58"})
_STATEMENT_CLASSES = frozenset({"42"})
# How often a statement that lost a race (RETRY) is run again before giving up on it.
RETRY_ATTEMPTS = 3
RETRY_PAUSE_SECONDS = 0.05


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of ``error`` or of what it wraps (SQLAlchemy's ``orig``, the cause)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(state, str) and state:
            return state
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


def classify(error: BaseException) -> DbErrorKind:
    """What ``error``, raised by a statement of the store, says about the database."""
    state = sqlstate(error)
    if state is not None:
        if state in _RETRY_STATES:
            return DbErrorKind.RETRY
        if state[:2] in _DATA_CLASSES:
            return DbErrorKind.DATA
        if state[:2] in _STATEMENT_CLASSES:
            return DbErrorKind.STATEMENT
        if state[:2] in _OUTAGE_CLASSES:
            return DbErrorKind.OUTAGE
        # 57014 (statement timeout, query cancelled) and the rest: the server is in trouble
        return DbErrorKind.OUTAGE
    if isinstance(error, StatementError) and not isinstance(error, DBAPIError):
        # SQLAlchemy could not bind the parameters (a value its serialiser refused): the
        # statement never left, and the data is to blame
        return DbErrorKind.DATA
    return DbErrorKind.OUTAGE


def is_database_error(error: BaseException) -> bool:
    """An error of the database or of the way to it (as opposed to the broker's or a bug's)."""
    return isinstance(error, (SQLAlchemyError, asyncpg.PostgresError, OSError, TimeoutError))


def is_data_error(error: BaseException) -> bool:
    return is_database_error(error) and classify(error) is DbErrorKind.DATA


def keeps_connection(error: BaseException) -> bool:
    """After ``error`` the connection is still good (the server refused only the statement)."""
    return classify(error) is not DbErrorKind.OUTAGE


async def retrying(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, run again (a few times, after a short pause) while it fails with a
    ``RETRY`` error: a statement PostgreSQL aborted for a deadlock or a serialisation failure
    changed nothing."""
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as exc:
            retry = is_database_error(exc) and classify(exc) is DbErrorKind.RETRY
            if not retry or attempt >= RETRY_ATTEMPTS:
                raise
            attempt += 1
            await asyncio.sleep(RETRY_PAUSE_SECONDS * attempt)
