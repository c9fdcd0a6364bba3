"""``worker run`` (one long-lived replica) and ``worker migrate`` (apply the migrations)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog
import uvloop
from aiormq.exceptions import AMQPError
from sqlalchemy.exc import SQLAlchemyError

from worker.logs import configure_logging
from worker.persistence import SchemaMismatch
from worker.replica import Replica
from worker.settings import ConfigError, Settings, load_settings

log = structlog.get_logger("worker.cli")


def find_alembic_ini() -> Path:
    """``alembic.ini`` in the current directory, else beside the package (a source checkout)."""
    for candidate in (Path.cwd() / "alembic.ini", Path(__file__).parent.parent / "alembic.ini"):
        if candidate.is_file():
            return candidate
    raise ConfigError("alembic.ini not found: run `worker migrate` from the project root")


def migrate(settings: Settings) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(find_alembic_ini()))
    config.attributes["database_url"] = settings.database_url
    command.upgrade(config, "head")


async def run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Replica(settings).run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worker", description=__doc__)
    parser.add_argument("command", choices=("run", "migrate"))
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        if args.command == "migrate":
            migrate(settings)
        else:
            settings.require_provider_url()
            uvloop.run(run(settings))
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    except SchemaMismatch as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 1
    except (AMQPError, SQLAlchemyError, OSError) as exc:
        print(f"worker: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
