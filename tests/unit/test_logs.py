"""worker/logs.py: our events and every library's `logging` records are one JSON object per
line on one stream, with the logger name, the level and the traceback as a field."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from worker.logs import configure_logging
from worker.settings import LogFormat


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, sys.excepthook
    out = io.StringIO()  # not a terminal
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.excepthook = hook
        logging.captureWarnings(False)
        structlog.reset_defaults()


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_our_events_keep_their_logger_name(stream: io.StringIO) -> None:
    configure_logging(LogFormat.AUTO, "info", stream=stream)
    structlog.get_logger("worker.pipeline").info("sent", attempt=1)
    structlog.get_logger("worker.pipeline").debug("not shown")
    (event,) = lines(stream)
    assert event["event"] == "sent"
    assert (event["logger"], event["level"], event["attempt"]) == ("worker.pipeline", "info", 1)
    assert event["timestamp"].endswith("Z")


def test_library_records_are_json_with_the_traceback_as_a_field(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, "info", stream=stream)
    logging.getLogger("aiormq.connection").info("below WARNING: libraries stay quiet")
    logging.getLogger("aio_pika.robust_connection").warning("reconnecting in %s s", 5)
    try:
        raise ConnectionResetError("peer gone")
    except ConnectionResetError:
        logging.getLogger("sqlalchemy.pool").exception("reset failed")
    warning, error = lines(stream)
    assert warning == {
        "event": "reconnecting in 5 s",
        "level": "warning",
        "logger": "aio_pika.robust_connection",
        "timestamp": warning["timestamp"],
    }
    assert (error["logger"], error["level"]) == ("sqlalchemy.pool", "error")
    assert error["exception"].startswith("Traceback (most recent call last):")
    assert "ConnectionResetError: peer gone" in error["exception"]


def test_alembic_speaks_at_the_configured_level(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, "info", stream=stream)
    logging.getLogger("alembic.runtime.migration").info("Running upgrade 0001 -> 0002")
    logging.getLogger("alembic.runtime.plugins").info("setup plugin x")
    (event,) = lines(stream)
    assert event["event"] == "Running upgrade 0001 -> 0002"


def test_debug_opens_the_libraries(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, "debug", stream=stream)
    logging.getLogger("asyncpg").debug("a debug record")
    assert [e["event"] for e in lines(stream)] == ["a debug record"]


def test_warnings_and_uncaught_exceptions_are_events(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, "info", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("coroutine was never awaited", RuntimeWarning, stacklevel=1)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    warned, uncaught = lines(stream)
    assert warned["logger"] == "py.warnings"
    assert "coroutine was never awaited" in warned["event"]
    assert (uncaught["event"], uncaught["level"]) == ("uncaught_exception", "critical")
    assert "ValueError: boom" in uncaught["exception"]


def test_configuring_twice_leaves_one_handler(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, "info", stream=stream)
    configure_logging(LogFormat.JSON, "info", stream=stream)
    logging.getLogger("aiohttp.server").error("once")
    assert len(lines(stream)) == 1


def test_console_format_is_not_json(stream: io.StringIO) -> None:
    configure_logging(LogFormat.CONSOLE, "info", stream=stream)
    structlog.get_logger("worker.replica").info("started")
    logging.getLogger("aiormq.connection").error("refused")
    text = stream.getvalue()
    assert "started" in text
    assert "refused" in text
    assert "aiormq.connection" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
