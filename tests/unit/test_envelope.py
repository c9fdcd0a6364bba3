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


# --- issue 10: untrusted headers, our own message ids, closed channels -------------------------


def _incoming(headers: dict[str, Any], *, closed: bool = False) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        headers=headers,
        body=b"{}",
        content_type="application/json",
        content_encoding=None,
        message_id="publisher-id",
        correlation_id=None,
        timestamp=None,
        type=None,
        app_id=None,
        routing_key="prices.x",
        redelivered=False,
        channel=SimpleNamespace(is_closed=closed),
    )


HOSTILE: dict[str, Any] = {
    ATTEMPT: 2**31,
    FIRST_SEEN_AT: "2001-01-01T00:00:00Z",
    "x-ignore-max-age": 1,
    "x-replayed-from": 5,
    "trace-id": "kept",
}


def test_a_fresh_publish_gets_nothing_from_our_headers() -> None:
    from worker.envelope import Delivery

    delivery = Delivery.of(_incoming(HOSTILE), fresh=True)
    assert delivery.attempt == 0
    assert not delivery.ignore_max_age
    assert delivery.first_seen_at == delivery.received_at
    republished = delivery.republish(1, "HTTP 500", 10)
    assert republished.headers is not None
    assert "x-ignore-max-age" not in republished.headers
    assert "x-replayed-from" not in republished.headers
    assert republished.headers["trace-id"] == "kept"


def test_a_message_back_from_the_work_queue_is_read_within_bounds() -> None:
    from worker.envelope import MAX_ATTEMPT, Delivery

    delivery = Delivery.of(_incoming(HOSTILE))
    assert delivery.attempt == MAX_ATTEMPT
    assert delivery.ignore_max_age  # a replay's, beside x-replayed-from
    assert delivery.first_seen_at == datetime(2001, 1, 1, tzinfo=UTC)


def test_a_retry_has_its_own_message_id_and_keeps_the_publishers() -> None:
    from worker.envelope import ORIGINAL_MESSAGE_ID, Delivery

    first = Delivery.of(_incoming({})).republish(1, None, 10)
    second = Delivery.of(_incoming({})).republish(1, None, 10)
    assert first.message_id != "publisher-id"
    assert first.message_id != second.message_id
    assert first.headers is not None
    assert first.headers[ORIGINAL_MESSAGE_ID] == "publisher-id"


def test_a_message_of_a_closed_channel_publishes_no_retry() -> None:
    from aio_pika.exceptions import ChannelInvalidStateError

    from worker.envelope import Delivery

    Delivery.of(_incoming({})).check_channel()
    with pytest.raises(ChannelInvalidStateError):
        Delivery.of(_incoming({}, closed=True)).check_channel()


def test_raw_headers_are_storable_and_say_so() -> None:
    from worker.envelope import Delivery

    raw = Delivery.of(_incoming({"bad": bytearray(b"\x00\xff"), "ok": 1})).raw()
    assert raw.headers["ok"] == 1
    assert "\x00" not in raw.headers["bad"]
    assert raw.sanitised == ("headers",)
    assert Delivery.of(_incoming({"ok": 1})).raw().sanitised == ()
