"""One short line for an exception, for logs, stored errors and one-line failures."""

from __future__ import annotations

ERROR_CHARS = 300


def describe_error(exc: BaseException, limit: int = ERROR_CHARS) -> str:
    """``Type: message`` on one line, at most ``limit`` characters. For a database error
    wrapped by SQLAlchemy, the driver's error (with its SQLSTATE's message), never the SQL."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        exc = orig
    stripped = str(exc).strip()
    text = stripped.splitlines()[0] if stripped else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
