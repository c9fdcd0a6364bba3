"""SPEC §1 headers: what the worker reads from an envelope and what it carries forward.

``Delivery.republish`` needs an aio-pika IncomingMessage and is left to integration tests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from worker.envelope import (
    ATTEMPT,
    FIRST_SEEN_AT,
    LAST_ERROR,
    carried_headers,
    read_attempt,
    read_first_seen,
)

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
EARLIER = datetime(2026, 11, 27, 9, 30, 0, 250000, tzinfo=UTC)


def test_header_names_match_spec() -> None:
    assert ATTEMPT == "x-attempt"
    assert FIRST_SEEN_AT == "x-first-seen-at"
    assert LAST_ERROR == "x-last-error"


# --- x-attempt --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, 0, id="absent"),
        pytest.param({"x-attempt": 0}, 0, id="zero"),
        pytest.param({"x-attempt": 2}, 2, id="int"),
        pytest.param({"x-attempt": "3"}, 3, id="str"),
        pytest.param({"x-attempt": b"4"}, 4, id="bytes"),
        pytest.param({"x-attempt": "garbage"}, 0, id="garbage"),
        pytest.param({"x-attempt": ""}, 0, id="empty"),
        pytest.param({"x-attempt": None}, 0, id="none"),
        pytest.param({"x-attempt": [1]}, 0, id="list"),
        pytest.param({"x-attempt": -1}, 0, id="negative"),
        pytest.param({"x-attempt": "-7"}, 0, id="negative-str"),
        pytest.param({"x-death": [{"count": 5}]}, 0, id="x-death-not-counted"),
    ],
)
def test_read_attempt(headers: dict[str, Any], expected: int) -> None:
    assert read_attempt(headers) == expected


# --- x-first-seen-at --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(EARLIER.isoformat(), EARLIER, id="str"),
        pytest.param("2026-11-27T09:30:00.250000Z", EARLIER, id="str-z"),
        pytest.param(EARLIER.isoformat().encode(), EARLIER, id="bytes"),
        pytest.param("2026-11-27T09:30:00.250000", EARLIER, id="naive-is-utc"),
        pytest.param(
            "2026-11-27T10:30:00.250000+01:00",
            EARLIER,
            id="offset",
        ),
    ],
)
def test_read_first_seen(value: str | bytes, expected: datetime) -> None:
    seen = read_first_seen({FIRST_SEEN_AT: value}, NOW)
    assert seen == expected
    assert seen.utcoffset() is not None


def test_read_first_seen_keeps_offset() -> None:
    plus_one = timezone(timedelta(hours=1))
    seen = read_first_seen({FIRST_SEEN_AT: "2026-11-27T10:30:00+01:00"}, NOW)
    assert seen.tzinfo == plus_one


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="absent"),
        pytest.param({FIRST_SEEN_AT: "garbage"}, id="garbage"),
        pytest.param({FIRST_SEEN_AT: ""}, id="empty"),
        pytest.param({FIRST_SEEN_AT: b"\xff\xfe"}, id="bad-bytes"),
        pytest.param({FIRST_SEEN_AT: 1795773600}, id="number"),
        pytest.param({FIRST_SEEN_AT: None}, id="none"),
    ],
)
def test_read_first_seen_falls_back_to_now(headers: dict[str, Any]) -> None:
    assert read_first_seen(headers, NOW) == NOW


def test_republished_first_seen_round_trips() -> None:
    """The worker writes ``first_seen_at.isoformat()``; reading it gives the same instant."""
    assert read_first_seen({FIRST_SEEN_AT: EARLIER.isoformat()}, NOW) == EARLIER


# --- carried headers --------------------------------------------------------------------------

BROKER_HEADERS: dict[str, Any] = {
    "x-death": [{"count": 1, "queue": "notifications.work.delay.03", "reason": "expired"}],
    "x-first-death-exchange": "notifications.work.delay.03",
    "x-first-death-queue": "notifications.work.delay.03",
    "x-first-death-reason": "expired",
    "x-last-death-exchange": "notifications.work.delay.00",
    "x-last-death-queue": "notifications.work.delay.00",
    "x-last-death-reason": "expired",
    "x-delay": 5000,
}
OUR_HEADERS: dict[str, Any] = {
    ATTEMPT: 2,
    FIRST_SEEN_AT: EARLIER.isoformat(),
    LAST_ERROR: "HTTP 503: busy",
    "trace-id": "abc123",
    "x-custom": "kept",
    "x-first-seen-by": "kept",
}


def test_carried_headers_strips_broker_headers_and_keeps_others() -> None:
    headers = {**BROKER_HEADERS, **OUR_HEADERS}
    assert carried_headers(headers) == OUR_HEADERS


def test_carried_headers_does_not_mutate_its_input() -> None:
    headers = {**BROKER_HEADERS, **OUR_HEADERS}
    carried = carried_headers(headers)
    carried["new"] = 1
    assert headers == {**BROKER_HEADERS, **OUR_HEADERS}


def test_carried_headers_empty() -> None:
    assert carried_headers({}) == {}
    assert carried_headers(BROKER_HEADERS) == {}


@pytest.mark.parametrize("name", ["x-delay-reason", "x-delayed-by", "x-deathly"])
def test_carried_headers_keeps_lookalike_names(name: str) -> None:
    assert carried_headers({name: "kept"}) == {name: "kept"}
