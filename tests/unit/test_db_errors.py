"""Database errors are classified by SQLSTATE in one place (worker.db_errors)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, OperationalError, StatementError

from worker.db_errors import DbErrorKind, classify, retrying, sqlstate
from worker.errors import describe_error


class _Driver(Exception):
    def __init__(self, state: str) -> None:
        super().__init__(f"sqlstate {state}")
        self.sqlstate = state


def _wrapped(state: str) -> DBAPIError:
    # what SQLAlchemy's asyncpg dialect raises: a DBAPIError whose orig carries the SQLSTATE
    return DBAPIError("SELECT 1", None, _Driver(state))


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ("22021", DbErrorKind.DATA),  # NUL in text
        ("22P05", DbErrorKind.DATA),  # \u0000 in jsonb
        ("22P02", DbErrorKind.DATA),  # NaN in jsonb
        ("22000", DbErrorKind.DATA),  # asyncpg could not encode a parameter
        ("22003", DbErrorKind.DATA),  # int4 overflow
        ("23514", DbErrorKind.DATA),  # check constraint
        ("54001", DbErrorKind.DATA),  # too deeply nested
        ("40P01", DbErrorKind.RETRY),
        ("40001", DbErrorKind.RETRY),
        ("42P01", DbErrorKind.STATEMENT),
        ("08006", DbErrorKind.OUTAGE),
        ("57P01", DbErrorKind.OUTAGE),
        ("57P03", DbErrorKind.OUTAGE),
        ("53300", DbErrorKind.OUTAGE),
    ],
)
def test_sqlstate_decides(state: str, kind: DbErrorKind) -> None:
    assert classify(_wrapped(state)) is kind
    assert classify(_Driver(state)) is kind  # the batched path's raw asyncpg error too
    assert sqlstate(_wrapped(state)) == state


def test_no_sqlstate_is_an_outage_but_a_refused_bind_is_data() -> None:
    assert classify(OSError("connection refused")) is DbErrorKind.OUTAGE
    assert classify(TimeoutError()) is DbErrorKind.OUTAGE
    assert classify(asyncpg.InterfaceError("connection is closed")) is DbErrorKind.OUTAGE
    assert classify(OperationalError("x", None, OSError("reset"))) is DbErrorKind.OUTAGE
    bind = StatementError("could not serialise", "INSERT …", None, TypeError("not JSON"))
    assert classify(bind) is DbErrorKind.DATA


async def test_a_lost_race_is_run_again_and_anything_else_is_not() -> None:
    calls: list[int] = []

    async def deadlocks_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise _wrapped("40P01")
        return "done"

    assert await retrying(deadlocks_once) == "done"
    assert len(calls) == 2

    async def data_error() -> str:
        calls.append(1)
        raise _wrapped("22021")

    calls.clear()
    with pytest.raises(DBAPIError):
        await retrying(data_error)
    assert len(calls) == 1


def test_describe_error_is_one_bounded_line_of_the_driver_error() -> None:
    line = describe_error(DBAPIError("SELECT secret_sql", None, _Driver("22021")))
    assert line == "_Driver: sqlstate 22021"
    assert len(describe_error(ValueError("x" * 1000))) == 300
    assert describe_error(ValueError("a\nb")) == "ValueError: a"
