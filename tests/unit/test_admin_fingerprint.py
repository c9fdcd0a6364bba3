"""Failure groups, fingerprints and the replay's pacing, without I/O."""

from __future__ import annotations

import hashlib

import pytest

from worker.admin.cli import build_parser, replay_request
from worker.admin.errors import UsageError
from worker.admin.fingerprint import failure_group, fingerprint
from worker.admin.pacing import Pacer

KEY_A = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
KEY_B = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            f"HTTP 500: upstream failed for key {KEY_A}",
            f"HTTP 500: upstream failed for key {KEY_B}",
        ),
        ("HTTP 403: plan lapsed for account 12345", "HTTP 403: plan lapsed for account 7"),
        (
            "HTTP 503: down since 2026-05-01T10:00:00.123456+02:00",
            "HTTP 503: down since 2026-11-27T23:59:59Z",
        ),
        (
            "HTTP 429: retry after Tue, 15 Nov 1994 08:12:31 GMT",
            "HTTP 429: retry after Wed, 16 Nov 1994 18:02:01 GMT",
        ),
        (
            "HTTP 400: request 123e4567-e89b-12d3-a456-426614174000 refused",
            "HTTP 400: request 00000000-0000-4000-8000-00000000abcd refused",
        ),
        (
            "HTTP 502: https://api.example.com/v1/notifications/email?id=1 failed",
            "HTTP 502: https://api.example.com/v1/notifications/sms?id=22&x=y failed",
        ),
        ("HTTP 400: recipient jane.doe@example.com bounced", "HTTP 400: recipient b@x.io bounced"),
        (
            "ClientConnectorError: Cannot connect to host 10.0.0.7:8081 ssl:default",
            "ClientConnectorError: Cannot connect to host 10.0.12.9:443 ssl:default",
        ),
        (
            "not UTF-8: can't decode byte 0xff in position 0",
            "not UTF-8: can't decode byte 0x9c in position 17",
        ),
        (
            "HTTP 404: message pi_3MtwBwLkdIwHu7ix28a3tqPa",
            "HTTP 404: message pi_9QxzAa12bb34Cc56dd78",
        ),
        ("HTTP 500:  boom\n\tagain ", "HTTP 500: boom again"),
    ],
)
def test_one_failure_with_different_details_is_one_group(first: str, second: str) -> None:
    assert failure_group(first) == failure_group(second)
    assert fingerprint(failure_group(first)) == fingerprint(failure_group(second))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ('HTTP 500: {"error": "upstream down for email/b"}', "HTTP 403: plan lapsed"),
        ("HTTP 500: boom", "HTTP 503: boom"),  # the status stays
        ("HTTP 403: plan lapsed", "HTTP 403: unknown audience"),
        ("timeout", "ServerDisconnectedError: Server disconnected"),
    ],
)
def test_different_failures_are_different_groups(first: str, second: str) -> None:
    assert failure_group(first) != failure_group(second)
    assert fingerprint(failure_group(first)) != fingerprint(failure_group(second))


@pytest.mark.parametrize(
    ("error", "group"),
    [
        (
            f'HTTP 500: {{"error": "injected failure 500", "key": "{KEY_A}"}}',
            'HTTP 500: {"error": "injected failure <n>", "key": "<hex>"}',
        ),
        ("HTTP 403: plan lapsed", "HTTP 403: plan lapsed"),
        (
            "may have been delivered (HTTP 500: boom 3)",
            "may have been delivered (HTTP 500: boom <n>)",
        ),
        ("https://h.example:8443/a/b?c=d", "https://h.example:<n>/<path>"),
        (
            "body of 70000 bytes exceeds the limit of 65536",
            "body of <n> bytes exceeds the limit of <n>",
        ),
        (None, ""),
        ("  ", ""),
    ],
)
def test_what_a_group_reads(error: str | None, group: str) -> None:
    assert failure_group(error) == group


def test_a_group_is_at_most_200_characters() -> None:
    assert len(failure_group("x" * 10_000)) == 200


def test_a_fingerprint_is_12_hex_of_the_md5_of_the_group() -> None:
    assert (
        fingerprint("HTTP 403: plan lapsed")
        == (hashlib.md5(b"HTTP 403: plan lapsed").hexdigest()[:12])
    )


def test_group_filters_take_fingerprints_only() -> None:
    args = build_parser().parse_args(["replay", "--group", "ABCDEF012345,abcdef012345"])
    request = replay_request(args, 10)
    assert request.filters.groups == ("abcdef012345",)
    assert request.filters.replayed is False  # a filter: never-replayed rows only
    with pytest.raises(UsageError, match="'abc' is not a failure group: 12 hex digits"):
        build_parser().parse_args(["list", "--group", "abc"])


@pytest.mark.parametrize(
    ("argv", "batch", "rate"),
    [
        (["--all"], 500, None),
        (["--all", "--rate", "50"], 50, 50.0),
        (["--all", "--rate", "2000", "--batch", "100"], 100, 2000.0),
        (["--all", "--rate", "0.5"], 1, 0.5),
    ],
)
def test_a_batch_is_never_larger_than_the_rate(
    argv: list[str], batch: int, rate: float | None
) -> None:
    request = replay_request(build_parser().parse_args(["replay", *argv]), 10)
    assert (request.batch, request.rate) == (batch, rate)


@pytest.mark.parametrize("rate", ["0", "-3", "fast", "inf"])
def test_a_rate_is_a_positive_number(rate: str) -> None:
    with pytest.raises(UsageError):
        build_parser().parse_args(["replay", "--all", "--rate", rate])


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


async def test_the_pacer_spaces_batches_by_their_size_over_the_rate() -> None:
    time = FakeTime()
    pacer = Pacer(10, time.clock, time.sleep)
    await pacer.wait()  # the first batch goes at once
    time.now += 0.2  # it takes 0.2 s
    pacer.spent(10)
    await pacer.wait()  # 10 messages at 10/s: the next starts 1 s after the first
    pacer.spent(5)
    time.now += 3.0  # a slow batch: the next starts at once, with no burst to catch up
    await pacer.wait()
    pacer.spent(10)
    await pacer.wait()
    assert time.sleeps == [0.8, 1.0]


async def test_no_rate_never_sleeps() -> None:
    time = FakeTime()
    pacer = Pacer(None, time.clock, time.sleep)
    for _ in range(3):
        await pacer.wait()
        pacer.spent(500)
    assert time.sleeps == []
