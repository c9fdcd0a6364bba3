"""The `worker` command: `worker run`, `worker migrate`, `worker check`, `worker --version`.

`worker check` is the container health check: it imports nothing beyond the standard
library, so that a probe every few seconds costs a few milliseconds of CPU, not the
worker's import time.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from worker import __version__

if TYPE_CHECKING:
    from worker.settings import Settings

DESCRIPTION = """\
The notification delivery worker: price changes from RabbitMQ to the provider's HTTP API,
outcomes recorded in PostgreSQL.
"""

EPILOG = """\
configuration (environment variables; every one, with its default, in docs/configuration.md):
  WORKER_AMQP_URL        the broker, amqp:// or amqps://
  WORKER_DATABASE_URL    PostgreSQL, postgresql+asyncpg://user:password@host:5432/db
  WORKER_PROVIDER_URL    the provider's base URL (run only)
  WORKER_QUEUE, WORKER_SOURCE_EXCHANGE, WORKER_CONCURRENCY, WORKER_DELAY_BACKEND,
  WORKER_MAX_ATTEMPTS, WORKER_BACKOFF, WORKER_SHUTDOWN_GRACE_SECONDS, ...
  WORKER_METRICS_PORT    /metrics, /healthz, /readyz (default 9464, 0 = off); read by check
  WORKER_LOG_FORMAT      json, console or auto (JSON unless stdout is a terminal)
  WORKER_LOG_LEVEL       debug, info, warning or error

exit status: 0 done (run: stopped by SIGTERM or SIGINT), 1 failure (database not migrated to
this version, broker credentials refused, check: not ready), 2 bad configuration or usage.
"""

DEFAULT_METRICS_PORT = 9464


def find_alembic_ini() -> Path:
    """`alembic.ini` in the current directory, else beside the package (a source checkout)."""
    from worker.settings import ConfigError

    for candidate in (Path.cwd() / "alembic.ini", Path(__file__).parent.parent / "alembic.ini"):
        if candidate.is_file():
            return candidate
    raise ConfigError("alembic.ini not found: run `worker migrate` from the project root")


def migrate(settings: Settings) -> None:
    import structlog
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(find_alembic_ini()))
    config.attributes["database_url"] = settings.database_url
    # Alembic's records go through our logging (worker/logs.py), not alembic.ini's text format.
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")
    head = ScriptDirectory.from_config(config).get_current_head()
    structlog.get_logger("worker.migrate").info("migrated", revision=head)


def _run(settings: Settings) -> None:
    import asyncio
    import gc
    import signal

    import uvloop

    from worker.replica import Replica

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Replica(settings).run(stop)

    # What is loaded by now (modules, pydantic's schemas, settings) lives as long as the
    # process: out of the collector's generations, it is not scanned again at every full
    # collection (measured here: a third of the time the collector took in a steady drain).
    gc.freeze()
    uvloop.run(run())


def check(port_text: str | None, timeout: float) -> tuple[int, str]:
    """Ask the local replica's `/readyz`: (0, "ready") or (1, why not)."""
    text = port_text if port_text is not None else str(DEFAULT_METRICS_PORT)
    try:
        port = int(text)
    except ValueError:
        return 2, f"WORKER_METRICS_PORT: not a port number (got {text!r})"
    if port == 0:
        return 1, "not ready: WORKER_METRICS_PORT is 0, the replica serves no /readyz"
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return 0, f"ready ({url} answered {answer.status})"
    except urllib.error.HTTPError as exc:
        return 1, f"not ready: {url} answered {exc.code}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return 1, f"not ready: {url}: {reason}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "run",
        help="one replica; SIGTERM or SIGINT drains it and exits 0",
        description="One long-lived replica. SIGTERM or SIGINT: stop consuming, finish "
        "in-flight work within WORKER_SHUTDOWN_GRACE_SECONDS, return the rest, exit 0.",
    )
    commands.add_parser(
        "migrate",
        help="apply the migrations to WORKER_DATABASE_URL",
        description="Apply the database migrations (Alembic upgrade head) to "
        "WORKER_DATABASE_URL; logs like the worker (WORKER_LOG_FORMAT).",
    )
    check_parser = commands.add_parser(
        "check",
        help="exit 0 if the local replica's /readyz is 200, else 1",
        description="Exit 0 when the replica on this host answers 200 on /readyz (port "
        "WORKER_METRICS_PORT, default 9464), else 1; one line says why.",
    )
    check_parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    return parser


def _fatal(as_json: bool, event: str, message: str) -> None:
    """A reason to stop: a JSON event on the log stream, or one line on stderr in a terminal."""
    if as_json:
        import structlog

        structlog.get_logger("worker.cli").critical(event, error=message)
    else:
        print(f"worker: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        code, reason = check(os.environ.get("WORKER_METRICS_PORT"), args.timeout)
        print(f"worker check: {reason}", file=sys.stdout if code == 0 else sys.stderr)
        return code

    from aiormq.exceptions import AMQPError
    from sqlalchemy.exc import SQLAlchemyError

    from worker.logs import configure_logging, use_json
    from worker.persistence import SchemaMismatch
    from worker.settings import ConfigError, LogFormat, load_settings

    try:
        early_format = LogFormat(os.environ.get("WORKER_LOG_FORMAT", "auto").lower())
    except ValueError:
        early_format = LogFormat.AUTO
    as_json = use_json(early_format)
    try:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        as_json = use_json(settings.log_format)
        if args.command == "migrate":
            migrate(settings)
        else:
            settings.require_provider_url()
            _run(settings)
    except ConfigError as exc:
        if as_json:
            configure_logging(early_format)
        _fatal(as_json, "configuration_error", f"configuration error: {exc}")
        return 2
    except SchemaMismatch as exc:
        _fatal(as_json, "schema_mismatch", str(exc))
        return 1
    except (AMQPError, SQLAlchemyError, OSError) as exc:
        _fatal(
            as_json, f"{args.command}_failed", f"{args.command} failed: {type(exc).__name__}: {exc}"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
