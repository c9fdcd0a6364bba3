"""The admin's two ways to fail, each shown as one line: bad usage (exit 2) and failure (1)."""

from __future__ import annotations

from urllib.parse import urlsplit

from sqlalchemy.exc import SQLAlchemyError


class AdminError(Exception):
    """Stops the command with ``message`` on one line and ``exit_code``."""

    exit_code = 1


class UsageError(AdminError):
    """A bad argument, filter or combination of options."""

    exit_code = 2


class Failure(AdminError):
    """The database, the broker or the data said no."""

    exit_code = 1


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line: the driver's error for a database error, never its SQL."""
    if isinstance(exc, SQLAlchemyError) and getattr(exc, "orig", None) is not None:
        exc = exc.orig  # type: ignore[attr-defined]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def scrub(message: str, *urls: str) -> str:
    """Remove the passwords of ``urls`` from ``message``, wherever an error quoted them."""
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            message = message.replace(password, "***")
    return message
