"""``worker-admin`` without I/O: arguments, selections, the replayed message, the summary."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import aio_pika
import pytest

from worker.admin.cli import build_parser, filters_of, parse_time, replay_request
from worker.admin.errors import UsageError, describe, scrub
from worker.admin.queries import Filters
from worker.admin.replay import ReplayReport, replay_message
from worker.decisions import priority_for
from worker.envelope import ATTEMPT, FIRST_SEEN_AT, IGNORE_MAX_AGE, LAST_ERROR, REPLAYED_FROM

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        ("90s", NOW - timedelta(seconds=90)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2026-04-30T10:00:00Z", datetime(2026, 4, 30, 10, tzinfo=UTC)),
        ("2026-04-30T12:00:00+02:00", datetime(2026, 4, 30, 10, tzinfo=UTC)),
        ("2026-04-30", datetime(2026, 4, 30, tzinfo=UTC)),
    ],
)
def test_times_are_rfc3339_or_a_span_ago(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-3d", "2026-04-30T10:00:00", "12"])
def test_unreadable_or_ambiguous_times_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time(text, NOW)


def test_list_filters_accept_comma_lists_and_repeats() -> None:
    args = parse(
        "list",
        "--reason",
        "rejected,expired",
        "--reason",
        "rejected",
        "--ticker",
        "aapl",
        "--channel",
        "sms",
        "--audience",
        "a,b",
        "--not-replayed",
    )
    filters = filters_of(args)
    assert filters.reasons == ("rejected", "expired")
    assert filters.tickers == ("AAPL",)
    assert (filters.channels, filters.audiences) == (("sms",), ("a", "b"))
    assert filters.replayed is False
    assert args.limit == 50
    assert not args.json


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--reason", "lost"],
        ["list", "--channel", "fax"],
        ["list", "--replayed", "--not-replayed"],
        ["list", "--limit", "-1"],
        ["show", "zero"],
        ["replay", "--batch", "0"],
        ["replay", "--id", "0"],
        ["purge", "--reason", "expired"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(*argv)


def test_since_must_precede_until() -> None:
    with pytest.raises(UsageError, match="--since must be before --until"):
        filters_of(parse("list", "--since", "1h", "--until", "2h"))


def test_replay_by_filters_or_all_takes_only_rows_never_replayed() -> None:
    request = replay_request(parse("replay", "--reason", "exhausted"), max_priority=10)
    assert request.filters == Filters(reasons=("exhausted",), replayed=False)
    assert (request.priority, request.batch, request.force) == (9, 500, False)
    assert replay_request(parse("replay", "--all"), 10).filters == Filters(replayed=False)
    again = replay_request(parse("replay", "--replayed", "--ticker", "X"), 10)
    assert again.filters == Filters(tickers=("X",), replayed=True)


def test_replay_by_id_takes_exactly_those_rows() -> None:
    request = replay_request(parse("replay", "--id", "3", "4,5", "--id", "3"), max_priority=10)
    assert request.filters == Filters(ids=(3, 4, 5))
    assert request.by_id


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay"], "replay what?"),
        (["replay", "--id", "1", "--all"], "--id and --all exclude each other"),
        (["replay", "--id", "1", "--reason", "expired"], "--id and filters exclude each other"),
        (["replay", "--all", "--not-replayed"], "filters and --all exclude each other"),
        (["replay", "--all", "--priority", "11"], "outside 0..10"),
        (["replay", "--all", "--priority", "-1"], "outside 0..10"),
    ],
)
def test_replay_selection_is_exactly_one_mode(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        replay_request(parse(*argv), max_priority=10)


@pytest.mark.parametrize("max_priority", [1, 5, 10, 255])
def test_replays_default_below_a_first_attempt_s_priority(max_priority: int) -> None:
    first = priority_for(0, max_priority)  # a message that has not failed yet
    assert replay_request(parse("replay", "--all"), max_priority).priority == first - 1


def test_replay_priority_is_validated_against_max_priority() -> None:
    assert replay_request(parse("replay", "--all", "--priority", "0"), 5).priority == 0
    assert replay_request(parse("replay", "--all"), 5).priority == 4


def _row(reason: str, headers: dict[str, object]) -> SimpleNamespace:
    return SimpleNamespace(
        id=17,
        reason=reason,
        payload=b'{"ticker":"AAPL"}',
        content_type="application/json",
        headers=headers,
    )


def test_the_replayed_message_is_a_first_attempt() -> None:
    stored = {
        ATTEMPT: 3,
        LAST_ERROR: "HTTP 500",
        FIRST_SEEN_AT: "2026-04-01T00:00:00+00:00",
        "x-death": [{"count": 1}],
        "x-custom": "kept",
    }
    message = replay_message(_row("exhausted", stored), 7, NOW, force=True)
    assert message.body == b'{"ticker":"AAPL"}'
    assert (message.priority, message.content_type) == (7, "application/json")
    assert message.delivery_mode is aio_pika.DeliveryMode.PERSISTENT
    assert message.headers == {
        "x-custom": "kept",
        REPLAYED_FROM: 17,
        FIRST_SEEN_AT: NOW.isoformat(),
    }


def test_only_a_forced_expired_row_ignores_the_max_age() -> None:
    assert replay_message(_row("expired", {}), 9, NOW, force=True).headers[IGNORE_MAX_AGE] == 1
    assert IGNORE_MAX_AGE not in replay_message(_row("rejected", {}), 9, NOW, True).headers
    assert IGNORE_MAX_AGE not in replay_message(_row("expired", {}), 9, NOW, False).headers
    # A forced replay's header, stored with a later dead letter, is carried like any other.
    kept = replay_message(_row("rejected", {IGNORE_MAX_AGE: 1}), 9, NOW, False)
    assert kept.headers[IGNORE_MAX_AGE] == 1


@pytest.mark.parametrize(
    ("report", "line"),
    [
        (ReplayReport(replayed=120), "replayed 120, skipped 0"),
        (
            ReplayReport(replayed=120, skipped={"expired": 3}),
            "replayed 120, skipped 3 (expired: use --force)",
        ),
        (
            ReplayReport(replayed=1, skipped={"invalid": 1, "expired": 2}),
            "replayed 1, skipped 3 (expired 2, invalid 1: use --force)",
        ),
        (
            ReplayReport(replayed=1, busy=2),
            "replayed 1, skipped 2 (2 being replayed by another worker-admin)",
        ),
    ],
)
def test_summary_line(report: ReplayReport, line: str) -> None:
    assert report.summary() == line


def test_errors_are_one_line_without_secrets() -> None:
    assert describe(ValueError("first\nsecond")) == "ValueError: first"
    assert scrub("amqp://u:pw1@h failed", "amqp://u:pw1@h/") == "amqp://u:***@h failed"
