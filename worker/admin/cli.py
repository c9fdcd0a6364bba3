"""The ``worker-admin`` command line: arguments, the five commands, exit statuses.

Exit 0 when done, 2 for bad usage (arguments, filters, conflicting options, bad WORKER_*
configuration), 1 for a failure (database or broker unreachable, unknown id, a refused publish,
an interruption); every error is one line on stderr starting ``worker-admin:``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NoReturn, TextIO

import uvloop
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from tqdm import tqdm

from worker import __version__
from worker.admin import partitions as partitions_module
from worker.admin import queries, render
from worker.admin.errors import AdminError, Failure, UsageError, describe, scrub
from worker.admin.fingerprint import FINGERPRINT_LENGTH, FINGERPRINT_PATTERN
from worker.admin.queries import Filters
from worker.admin.replay import ReplayRequest, plan, prepare, replay
from worker.broker import connect_first
from worker.persistence import create_engine
from worker.schema import DEAD_LETTER_REASONS
from worker.settings import ConfigError, Settings, load_settings, mask_url
from worker.topology import Names

PROG = "worker-admin"
CHANNELS = ("email", "sms")
DEFAULT_LIMIT = 50
DEFAULT_BATCH = 500
MAX_BATCH = 10_000
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

REPLAY_HELP = """\
Put dead letters back on the work queue (WORKER_QUEUE) as first attempts, in batches, each
batch one transaction with its publisher-confirmed publish. Choose exactly one selection:
--id ID… replays exactly those rows (replayed before or not); the filters or --all take only
rows never replayed (so replaying twice publishes nothing twice), unless --replayed asks for
the rows replayed before. Rows of reason expired or invalid are skipped unless --force; an
expired row replayed with --force is sent despite WORKER_MAX_AGE_SECONDS. Concurrent replays
never publish a row twice (FOR UPDATE SKIP LOCKED). Replays go at --priority, by default
WORKER_MAX_PRIORITY - 1, in the work queue, which replicas serve only with slots that no fresh
message wants, so live alerts overtake a replay waiting in the queue. --rate N paces the
replay to N messages a second (batches of at most N). Ctrl-C or SIGTERM finishes the batch in
progress and stops: each row is either replayed or untouched; run the same command again for
the rest. A second one aborts the batch in progress too.
"""

ADMIN_EPILOG = """\
configuration (environment variables, as for `worker`; docs/configuration.md):
  WORKER_DATABASE_URL    PostgreSQL, postgresql+asyncpg://user:password@host:5432/db
  WORKER_AMQP_URL        the broker (replay only)
  WORKER_QUEUE           the work queue replay publishes to
  WORKER_MAX_PRIORITY    replay's default priority is this minus 1

exit status: 0 done, 1 failure (database or broker unreachable, unknown id, refused publish,
interrupted), 2 bad usage or configuration; errors are one line on stderr.
Guide: docs/admin.md.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (our exit 2) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _WideHelp(argparse.RawDescriptionHelpFormatter):
    """argparse measures the commands one indent short of where it prints them: add it, so
    that each command's help stays on its line."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += self._indent_increment


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """RFC 3339 (``2026-05-01T12:00:00Z``, or a date, meaning midnight UTC) or a span ago
    (``30m``, ``2h``, ``7d``, ``1w``, ``90s``)."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = float(relative.group(1)), _UNITS[relative.group(2)]
        return now - timedelta(**{unit: amount})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither RFC 3339 (2026-05-01T12:00:00Z) nor a span like 30m, 2h, 7d"
        ) from None
    if value.tzinfo is None:
        if "T" in text or " " in text.strip():
            raise argparse.ArgumentTypeError(f"{text!r} needs an offset, e.g. Z or +02:00")
        value = value.replace(tzinfo=UTC)
    return value


def _words(text: str) -> list[str]:
    return [word.strip() for word in text.split(",") if word.strip()]


def _choices(name: str, allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        words = _words(text)
        for word in words:
            if word not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown {name} {word!r}: one of {', '.join(allowed)}"
                )
        return words

    return parse


def _ids(text: str) -> list[int]:
    try:
        ids = [int(word) for word in _words(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id or a comma list of ids") from None
    if not ids or min(ids) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: ids are positive integers")
    return ids


def _fingerprints(text: str) -> list[str]:
    words = [word.lower() for word in _words(text)]
    for word in words:
        if not FINGERPRINT_PATTERN.fullmatch(word):
            raise argparse.ArgumentTypeError(
                f"{word!r} is not a failure group: {FINGERPRINT_LENGTH} hex digits,"
                " the GROUP column of `worker-admin stats`"
            )
    return words


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text}: messages per second, more than 0")
    return value


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _add_list_option(
    parser: argparse._ActionsContainer,
    flag: str,
    dest: str,
    parse: Callable[[str], list[str]],
    metavar: str,
    help: str,
) -> None:
    parser.add_argument(
        flag, dest=dest, action="extend", default=[], type=parse, metavar=metavar, help=help
    )


def _add_filters(parser: argparse.ArgumentParser, replay: bool = False) -> None:
    group = parser.add_argument_group("filters (combined with AND; lists with , or repeated)")
    reasons = ", ".join(DEAD_LETTER_REASONS)
    _add_list_option(
        group, "--reason", "reasons", _choices("reason", DEAD_LETTER_REASONS), "R", reasons
    )
    group.add_argument("--since", type=parse_time, metavar="T", help="dead_at >= T: RFC 3339, 2h")
    group.add_argument("--until", type=parse_time, metavar="T", help="dead_at < T: RFC 3339, 30m")
    _add_list_option(group, "--ticker", "tickers", _words, "TICKER", "e.g. AAPL,MSFT")
    _add_list_option(
        group, "--channel", "channels", _choices("channel", CHANNELS), "CH", "email or sms"
    )
    _add_list_option(group, "--audience", "audiences", _words, "AUD", "the recipient group")
    _add_list_option(
        group, "--group", "groups", _fingerprints, "GROUP", "failure group, from `stats`"
    )
    replayed = group.add_mutually_exclusive_group()
    replayed.add_argument(
        "--replayed",
        dest="replayed",
        action="store_const",
        const=True,
        default=None,
        help="only rows replayed before" + (" (to replay them again)" if replay else ""),
    )
    replayed.add_argument(
        "--not-replayed",
        dest="replayed",
        action="store_const",
        const=False,
        help="only rows never replayed" + (" (the default of replay)" if replay else ""),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The dead-letter admin: list, show, replay onto the work queue, purge\n"
        "and count the rows of the dead_letters table in PostgreSQL; and the provider's\n"
        "health per partition.",
        epilog=ADMIN_EPILOG,
        formatter_class=_WideHelp,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="dead letters, newest first")
    _add_filters(listing)
    listing.add_argument(
        "--limit", type=_bounded(0, 1_000_000), default=DEFAULT_LIMIT, help="0 = all (50)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON array, stable keys")

    show = commands.add_parser("show", help="everything about one dead letter")
    show.add_argument("id", type=_bounded(1, 2**63 - 1))
    show.add_argument("--json", action="store_true")

    replaying = commands.add_parser(
        "replay",
        help="put dead letters back on the work queue",
        description=REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    selection = replaying.add_argument_group("selection (exactly one: --id, filters or --all)")
    selection.add_argument(
        "--id",
        dest="ids",
        action="extend",
        nargs="+",
        default=[],
        type=_ids,
        metavar="ID",
        help="exactly these rows, replayed before or not",
    )
    selection.add_argument("--all", action="store_true", help="every row never replayed")
    _add_filters(replaying, replay=True)
    replaying.add_argument("--force", action="store_true", help="also expired and invalid rows")
    replaying.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed; change nothing"
    )
    replaying.add_argument(
        "--priority", type=int, help="of the replayed messages (default: WORKER_MAX_PRIORITY - 1)"
    )
    replaying.add_argument(
        "--batch",
        type=_bounded(1, MAX_BATCH),
        default=DEFAULT_BATCH,
        help=f"rows per transaction ({DEFAULT_BATCH}; at most --rate)",
    )
    replaying.add_argument(
        "--rate", type=_rate, metavar="N", help="at most N messages per second (default: no limit)"
    )

    purge = commands.add_parser("purge", help="delete dead letters that died before T")
    purge.add_argument(
        "--before", type=parse_time, required=True, metavar="T", help="RFC 3339, or 7d ago"
    )
    _add_list_option(
        purge, "--reason", "reasons", _choices("reason", DEAD_LETTER_REASONS), "R", "only these"
    )
    purge.add_argument("--yes", action="store_true", help="do not ask (required without a TTY)")

    stats = commands.add_parser(
        "stats", help="counts by reason, failure group, channel and audience"
    )
    _add_filters(stats)
    stats.add_argument("--json", action="store_true")

    partitions = commands.add_parser(
        "partitions",
        help="the provider's health per partition; hold one open or close it",
        description="List the partitions that have failed or hold parked messages; hold one "
        "open (nothing sent or probed until closed) or close one now (its parked messages are "
        "released at once).",
    )
    partitions.add_argument("--json", action="store_true")
    steering = partitions.add_subparsers(dest="action", metavar="ACTION")
    for action, what in (
        ("hold", "hold it open until closed: nothing sent or probed, everything parks"),
        ("close", "close it now: its parked messages are released at once"),
    ):
        steer = steering.add_parser(action, help=what)
        steer.add_argument("key", metavar="KEY", help="the partition, e.g. email|premium")
    return parser


def filters_of(args: argparse.Namespace) -> Filters:
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise UsageError("--since must be before --until")
    return Filters(
        reasons=tuple(dict.fromkeys(args.reasons)),
        since=args.since,
        until=args.until,
        tickers=tuple(dict.fromkeys(t.upper() for t in args.tickers)),
        channels=tuple(dict.fromkeys(args.channels)),
        audiences=tuple(dict.fromkeys(args.audiences)),
        groups=tuple(dict.fromkeys(args.groups)),
        replayed=args.replayed,
    )


def replay_request(args: argparse.Namespace, max_priority: int) -> ReplayRequest:
    """Exactly one of --id, the filters, --all; the filters and --all skip replayed rows."""
    filters = filters_of(args)
    ids = tuple(dict.fromkeys(i for group in args.ids for i in group))
    modes = [
        name
        for name, on in (("--id", ids), ("filters", filters != Filters()), ("--all", args.all))
        if on
    ]
    if not modes:
        raise UsageError("replay what? give --id ID…, filters (--reason, --since, …) or --all")
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} exclude each other: choose one selection")
    if ids:
        filters = Filters(ids=ids)
    elif filters.replayed is None:
        filters = dataclasses.replace(filters, replayed=False)
    priority = max_priority - 1 if args.priority is None else args.priority
    if not 0 <= priority <= max_priority:
        raise UsageError(
            f"--priority {priority} is outside 0..{max_priority} (WORKER_MAX_PRIORITY)"
        )
    batch = args.batch if args.rate is None else max(1, min(args.batch, int(args.rate)))
    return ReplayRequest(
        filters=filters, force=args.force, priority=priority, batch=batch, rate=args.rate
    )


async def _list(engine: AsyncEngine, args: argparse.Namespace, out: TextIO) -> None:
    filters = filters_of(args)
    limit = args.limit or None
    async with engine.connect() as conn:
        rows = await queries.list_rows(conn, filters, limit)
        total = len(rows)
        if not args.json and limit is not None and len(rows) == limit:
            total = await queries.count_rows(conn, filters)
    if args.json:
        print(render.to_json([render.record(row, render.LIST_KEYS) for row in rows]), file=out)
        return
    if not rows:
        print("no dead letters match", file=out)
        return
    print(render.dead_letter_table(rows), file=out)
    if total > len(rows):
        print(f"({len(rows)} of {total}, newest first; --limit N, or 0 for all)", file=out)


async def _show(engine: AsyncEngine, args: argparse.Namespace, out: TextIO) -> None:
    async with engine.connect() as conn:
        row = await queries.get_row(conn, args.id)
        if row is None:
            raise Failure(f"no dead letter with id {args.id}")
        key = row.idempotency_key
        delivery = None if key is None else await queries.get_delivery(conn, key)
    if args.json:
        print(render.to_json(render.show_json(row, delivery)), file=out)
    else:
        print(render.show_text(row, delivery), file=out)


async def _stats(engine: AsyncEngine, args: argparse.Namespace, out: TextIO) -> None:
    async with engine.connect() as conn:
        result = await queries.stats(conn, filters_of(args))
    print(
        render.to_json(render.stats_json(result)) if args.json else render.stats_text(result),
        file=out,
    )


async def _partitions(engine: AsyncEngine, args: argparse.Namespace, out: TextIO) -> None:
    if args.action is not None:
        after = await partitions_module.steer(engine, args.action, args.key)
        print(f"{after.key}: {after.state.value}{' (held)' if after.held else ''}", file=out)
        return
    rows = await partitions_module.list_partitions(engine)
    shown = partitions_module.partitions_json if args.json else partitions_module.partitions_table
    print(shown(rows), file=out)


async def _purge(engine: AsyncEngine, args: argparse.Namespace, out: TextIO) -> None:
    filters = Filters(reasons=tuple(dict.fromkeys(args.reasons)), until=args.before)
    async with engine.connect() as conn:
        count = await queries.count_rows(conn, filters)
    before = render.timestamp(args.before)
    if count == 0:
        print(f"deleted 0 dead letters (none died before {before})", file=out)
        return
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"would delete {count} dead letters: pass --yes (no terminal to ask)")
        answer = await asyncio.to_thread(_ask, f"delete {count} dead letters? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise Failure("not confirmed: nothing deleted")
    deleted = await queries.purge(engine, filters)
    print(f"deleted {deleted} dead letters (died before {before})", file=out)


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        return ""


async def _replay(
    engine: AsyncEngine, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO
) -> None:
    request = replay_request(args, settings.max_priority)
    if args.dry_run:
        report = await plan(engine, request, DEFAULT_LIMIT)
        if report.planned:
            print(render.dead_letter_table(report.planned), file=out)
        if report.selected > len(report.planned):
            print(f"(the first {len(report.planned)} of {report.selected}, oldest first)", file=out)
        print(
            f"{report.summary(dry_run=True)}; dry run: nothing published, nothing changed", file=out
        )
        return
    report = await prepare(engine, request)
    connection = await _connect_broker(settings.amqp_urls)
    # on a terminal only, and only once a replay has run for a second
    bar = tqdm(
        total=report.selected,
        unit="msg",
        desc="replay",
        file=err,
        delay=1.0,
        leave=False,
        disable=not err.isatty(),
    )
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # where a first attempt belongs, in either WORKER_QUEUE_TYPE: the work queue itself
        first_attempts = Names(settings.queue).attempt_queue(0, settings.attempt_queues)
        await replay(engine, channel, first_attempts, request, report, bar.update)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise Failure(
            f"interrupted: replayed {report.replayed}, every other row untouched;"
            " run the same command again to replay the rest"
        ) from None
    except Failure as exc:
        raise Failure(f"{exc}; batch rolled back, {report.replayed} replayed before it") from None
    except (SQLAlchemyError, AMQPError, ChannelInvalidStateError, OSError) as exc:
        raise Failure(
            f"replay failed: {describe(exc)};"
            f" batch rolled back, {report.replayed} replayed before it"
        ) from None
    finally:
        bar.close()
        await connection.close()
    print(report.summary(), file=out)


async def _connect_broker(urls: list[str]) -> AbstractConnection:
    """The first node of the list that answers."""
    try:
        return await connect_first(urls, timeout=10)
    except (AMQPError, OSError, TimeoutError) as exc:
        shown = mask_url(",".join(urls))
        raise Failure(f"cannot reach the broker at {shown}: {describe(exc)}") from None


async def run_admin(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The whole command in the running event loop: parse, run, report; returns the exit status.

    Results go to ``out`` and the one-line error to ``err`` (default stdout and stderr).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    settings: Settings | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 0
        settings = load_settings()
        engine = create_engine(settings.database_url, pool_size=2)
        try:
            if args.command == "replay":
                await _replay(engine, settings, args, out, err)
            else:
                command = {
                    "list": _list,
                    "show": _show,
                    "stats": _stats,
                    "purge": _purge,
                    "partitions": _partitions,
                }
                await command[args.command](engine, args, out)
        except BrokenPipeError:
            raise  # the reader of our output went away (`| head`): not a database error
        except (SQLAlchemyError, OSError) as exc:
            raise Failure(
                f"database error at {mask_url(settings.database_url)}: {describe(exc)}"
            ) from None
        finally:
            await engine.dispose()
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", 2, err)
    except AdminError as exc:
        urls = () if settings is None else (settings.database_url, settings.amqp_url)
        return _fail(scrub(str(exc), *urls), exc.exit_code, err)
    return 0


def _fail(message: str, code: int, err: TextIO | None = None) -> int:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr if err is None else err)
    return code


async def _interruptible(argv: Sequence[str] | None) -> int:
    """:func:`run_admin` with Ctrl-C (SIGINT) and SIGTERM cancelling it, each time: the first
    lets a replay finish its batch in progress and stop, a second aborts that batch too."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await run_admin(argv)
    except asyncio.CancelledError:
        return _fail("interrupted", 1)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return uvloop.run(_interruptible(argv))
    except KeyboardInterrupt:  # before the event loop runs
        return _fail("interrupted", 1)
    except BrokenPipeError:
        # stdout was closed early (`worker-admin list | head`): stop quietly, as cat would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - a CLI answers in one line, never a traceback
        return _fail(f"unexpected error: {describe(exc)}", 1)


if __name__ == "__main__":
    raise SystemExit(main())
