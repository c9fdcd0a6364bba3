"""Property tests (hypothesis): whatever the bytes or header values, the parser and the header
readers answer with a value or InvalidMessage, never another exception; and what they let
through is storable in PostgreSQL (no NUL, no surrogate, bounded)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.envelope import (
    ATTEMPT,
    FIRST_SEEN_AT,
    IGNORE_MAX_AGE,
    MAX_ATTEMPT,
    REPLAYED_FROM,
    read_attempt,
    read_first_seen,
    read_ignore_max_age,
    read_replayed_from,
)
from worker.message import InvalidMessage, PriceChange, parse_message
from worker.storable import dumps, has_unstorable, storable_json, storable_text

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
# derandomized: the same 300 examples every run, so that CI never fails by the luck of a draw
FAST = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Every value an AMQP field table can carry, as aiormq/pamqp decode them, and worse.
header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.decimals(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary(max_size=64)
    | st.datetimes(timezones=st.none() | st.just(UTC))
    | st.sampled_from(["\x00", "\ud800", "NaN", "Infinity", "-1", "2147483648", "1e400", " 3 "]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
header_tables = st.dictionaries(
    st.sampled_from([ATTEMPT, FIRST_SEEN_AT, IGNORE_MAX_AGE, REPLAYED_FROM]) | st.text(max_size=8),
    header_values,
    max_size=6,
)


def _valid_fields() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "ticker": st.from_regex(r"\A[A-Z0-9.\-]{1,16}\Z"),
            "price": st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1e6"), places=2).map(
                str
            ),
            "occurred_at": st.datetimes(
                min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)
            ).map(lambda d: d.replace(tzinfo=UTC).isoformat()),
            "channel": st.sampled_from(["email", "sms"]),
            "audience": st.from_regex(r"\A[a-z0-9_\-]{1,64}\Z"),
        },
        optional={"text": st.text(max_size=50), "extra": header_values},
    )


def _check(body: bytes) -> None:
    try:
        message = parse_message(body, NOW, content_type="application/json", max_bytes=65536)
    except InvalidMessage:
        return
    assert isinstance(message, PriceChange)
    assert len(message.idempotency_key) == 64
    stored = dumps(message.stored_payload())
    assert not has_unstorable(stored)
    assert not has_unstorable(json.loads(stored).__repr__())


@FAST
@given(st.binary(max_size=512))
def test_any_bytes_parse_or_are_invalid(body: bytes) -> None:
    _check(body)


@FAST
@given(_valid_fields())
def test_near_valid_messages_parse_or_are_invalid(fields: dict[str, Any]) -> None:
    _check(json.dumps(fields, default=str).encode("utf-8", "surrogatepass"))


@FAST
@given(
    st.recursive(
        st.text() | st.integers() | st.floats(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_any_json_parses_or_is_invalid(value: object) -> None:
    _check(json.dumps(value).encode())


def test_the_issue_cases_are_invalid_not_errors() -> None:
    cases = [
        b"[" * 5000,
        b'{"a":' * 5000,
        json.dumps({"ticker": "A", "text": "\x00"}).encode(),
        b'{"ticker":"A","price":"1","occurred_at":"0001-01-01T00:00:00+01:00",'
        b'"channel":"email","audience":"a"}',
        b'{"ticker":"A","price":"1","occurred_at":"9999-12-31T23:59:59-01:00",'
        b'"channel":"email","audience":"a"}',
        b'{"ticker":"A","price":"1","occurred_at":"2026-11-27T10:00:00Z",'
        b'"channel":"email","audience":"a","x":"\\ud800"}',
        b'{"ticker":"A","price":"1","occurred_at":"2026-11-27T10:00:00Z",'
        b'"channel":"email","audience":"a","\\u0000":1}',
        b'{"ticker":"A","price":"1","occurred_at":"2026-11-27T10:00:00Z",'
        b'"channel":"email","audience":"a","x":' + b"9" * 5000 + b"}",
    ]
    for body in cases:
        try:
            parse_message(body, NOW)
        except InvalidMessage:
            continue
        raise AssertionError(f"accepted {body[:60]!r}")


def test_year_one_in_utc_is_valid_and_keyed_with_four_digits() -> None:
    body = (
        b'{"ticker":"A","price":"1","occurred_at":"0001-01-01T00:00:00Z",'
        b'"channel":"email","audience":"a"}'
    )
    assert parse_message(body, NOW).occurred_at_text == "0001-01-01T00:00:00.000000Z"


@FAST
@given(header_tables)
def test_header_readers_never_raise_and_stay_bounded(headers: dict[str, Any]) -> None:
    attempt = read_attempt(headers)
    assert 0 <= attempt <= MAX_ATTEMPT
    seen = read_first_seen(headers, NOW)
    assert seen.utcoffset() is not None
    assert datetime(2000, 1, 1, tzinfo=UTC) <= seen <= NOW + timedelta(minutes=5)
    replayed = read_replayed_from(headers)
    assert replayed is None or 0 < replayed < 2**63
    if read_ignore_max_age(headers):
        assert replayed is not None


@FAST
@given(header_tables)
def test_headers_are_made_storable_json(headers: dict[str, Any]) -> None:
    stored, _ = storable_json(headers)
    text = dumps(stored)  # allow_nan=False: raises on NaN
    assert not has_unstorable(text)
    assert len(text) < 200_000
    json.loads(text)


@FAST
@given(st.text())
def test_storable_text(value: str) -> None:
    cleaned, changed = storable_text(value, 100)
    assert not has_unstorable(cleaned)
    assert len(cleaned) <= 100
    assert changed == (cleaned != value)


def test_attempt_headers_from_the_issue() -> None:
    assert read_attempt({ATTEMPT: 2**31}) == MAX_ATTEMPT
    assert read_attempt({ATTEMPT: float("inf")}) == 0
    assert read_attempt({ATTEMPT: float("nan")}) == 0
    assert read_attempt({ATTEMPT: b"\x00"}) == 0
    assert read_attempt({ATTEMPT: True}) == 0
    assert read_first_seen({FIRST_SEEN_AT: "0001-01-01T00:00:00+01:00"}, NOW) == NOW
    assert read_first_seen({FIRST_SEEN_AT: "9999-12-31T23:59:59-01:00"}, NOW) == NOW
    assert not read_ignore_max_age({IGNORE_MAX_AGE: 1})
    assert read_ignore_max_age({IGNORE_MAX_AGE: 1, REPLAYED_FROM: 7})
    assert not math.isnan(float(read_attempt({ATTEMPT: Decimal("NaN")})))
