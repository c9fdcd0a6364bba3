"""One short line for an exception, for logs and stored errors."""

from __future__ import annotations

ERROR_CHARS = 300


def describe_error(exc: BaseException, limit: int = ERROR_CHARS) -> str:
    """``"TimeoutError: connect timed out"``, at most ``limit`` characters."""
    text = str(exc)
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line[:limit]
