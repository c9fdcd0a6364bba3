"""The admin's two ways to fail, each shown as one line: bad usage (exit 2) and failure (1)."""

from __future__ import annotations

from urllib.parse import urlsplit

from worker.errors import describe_error


class AdminError(Exception):
    """Stops the command with ``message`` on one line and ``exit_code``."""

    exit_code = 1


class UsageError(AdminError):
    """A bad argument, filter or combination of options."""

    exit_code = 2


class Failure(AdminError):
    """The database, the broker or the data said no."""

    exit_code = 1


describe = describe_error  # ``Type: message`` on one line: the driver's error, never its SQL


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
