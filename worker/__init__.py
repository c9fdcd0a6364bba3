"""Notification delivery worker: RabbitMQ in, a flaky HTTP provider out, PostgreSQL as record."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("notification-worker")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
