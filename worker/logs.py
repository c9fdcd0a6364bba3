"""Structured logging: one stream (stdout), JSON lines in production, readable lines in a terminal.

Two paths end in the same renderer and the same stream:

- our events (``structlog.get_logger(name)``) are rendered by structlog itself and written by a
  :class:`NamedWriteLogger`: no :mod:`logging` record, handler or lock per event, which matters
  on the hot path (a few events per message), but the logger name is kept;
- every other library's :mod:`logging` records (aio-pika, aiormq, SQLAlchemy, asyncpg, aiohttp,
  Alembic, asyncio, and Python warnings) go through one root handler whose
  :class:`structlog.stdlib.ProcessorFormatter` gives them the same fields: ``event``,
  ``level``, ``logger``, ``timestamp`` and, for an exception, ``exception`` (the traceback as
  one field of the line, not lines of its own).

Libraries log at WARNING and above (Alembic at the configured level, so that ``worker migrate``
says which revisions it ran); ``WORKER_LOG_LEVEL=debug`` opens them all.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.settings import LogFormat

# Loggers let through at the configured level, not WARNING: Alembic says which revisions it
# runs (but not which of its plugins it sets up).
_VERBOSE_LIBRARIES = ("alembic",)
_QUIET_LIBRARIES = ("alembic.runtime.plugins",)


class NamedWriteLogger(structlog.WriteLogger):
    """structlog's :class:`~structlog.WriteLogger` (a write and a flush per line) with a name,
    so that :func:`structlog.stdlib.add_logger_name` can add it to the event."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)  # structlog's lock for the file, shared by all its loggers
        self.name = name


class NamedWriteLoggerFactory:
    """``structlog.get_logger(name)`` → a :class:`NamedWriteLogger` on ``file``."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> NamedWriteLogger:
        name = str(args[0]) if args and args[0] is not None else "worker"
        return NamedWriteLogger(self._file, name)


class _WriteHandler(logging.Handler):
    """The root handler: a formatted record is written like one of our events, under the
    same lock, so that a library's line never interleaves with ours."""

    def __init__(self, file: TextIO) -> None:
        super().__init__()
        self._out = NamedWriteLogger(file, "")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:  # noqa: BLE001 (logging's own contract: report, never raise)
            self.handleError(record)


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger"] = record.name
    elif "logger" not in event_dict:
        event_dict["logger"] = getattr(logger, "name", None) or "worker"
    return event_dict


def use_json(fmt: LogFormat, stream: TextIO | None = None) -> bool:
    """JSON for ``json``, and for ``auto`` unless ``stream`` (stdout) is a terminal."""
    stream = stream or sys.stdout
    return fmt is LogFormat.JSON or (fmt is LogFormat.AUTO and not stream.isatty())


def configure_logging(
    fmt: LogFormat = LogFormat.AUTO, level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library's root logger; idempotent."""
    stream = stream or sys.stdout
    as_json = use_json(fmt, stream)
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # In a terminal the console renderer prints the traceback itself, nicely.
    exc_info: list[Processor] = [structlog.processors.format_exc_info] if as_json else []
    structlog.configure(
        processors=[*shared, *exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=NamedWriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )

    handler = _WriteHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    # WARNING and above from the libraries, everything at debug
    library_level = (
        numeric_level if numeric_level <= logging.DEBUG else max(numeric_level, logging.WARNING)
    )
    root.setLevel(library_level)
    for name in _VERBOSE_LIBRARIES:
        logging.getLogger(name).setLevel(numeric_level)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    # warnings.warn(...) → logger "py.warnings", not bare text on stderr
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: types.TracebackType | None
) -> None:
    """An exception that ends the process is one more event, not a traceback on stderr."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("worker").critical("uncaught_exception", exc_info=(kind, value, traceback))
