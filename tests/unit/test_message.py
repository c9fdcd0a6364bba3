"""SPEC §1: validation of the input message, the idempotency key and the topic key."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from worker.message import (
    InvalidMessage,
    PriceChange,
    format_timestamp,
    normalise_decimal,
    parse_message,
)

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)

SPEC_KEY_TEXT = "AAPL|189.1|2026-11-27T10:00:00.000000Z|email|premium"
SPEC_KEY = "000cc2ffa1b0fb3480a0e6415df640f35adcc67a2eebf244a54e175ce01b4468"

_MISSING = object()

BASE: dict[str, Any] = {
    "ticker": "AAPL",
    "price": "189.10",
    "occurred_at": "2026-11-27T10:00:00Z",
    "channel": "email",
    "audience": "premium",
}


def _body(**changes: Any) -> bytes:
    """BASE with fields changed; a field set to ``_MISSING`` is removed."""
    data = {**BASE, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not _MISSING}).encode()


def _raw(literal: str, field: str = "price") -> bytes:
    """BASE with ``field`` written as a raw JSON literal (number, NaN, Infinity, ...)."""
    return _body(**{field: "@RAW@"}).replace(b'"@RAW@"', literal.encode())


def _parse(body: bytes) -> PriceChange:
    return parse_message(body, NOW)


# --- the idempotency key ---------------------------------------------------------------------


def test_spec_example_key_is_sha256_of_the_spec_string() -> None:
    assert hashlib.sha256(SPEC_KEY_TEXT.encode()).hexdigest() == SPEC_KEY


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_body(), id="price-string-189.10"),
        pytest.param(_body(price="189.1"), id="price-string-189.1"),
        pytest.param(_raw("189.10"), id="price-number-189.10"),
        pytest.param(_raw("189.1"), id="price-number-189.1"),
        pytest.param(_raw("1.891E+2"), id="price-number-exponent"),
        pytest.param(_body(price="1891E-1"), id="price-string-exponent"),
        pytest.param(_body(occurred_at="2026-11-27T11:00:00+01:00"), id="offset-plus-1"),
        pytest.param(_body(occurred_at="2026-11-27T05:00:00-05:00"), id="offset-minus-5"),
        pytest.param(_body(occurred_at="2026-11-27T10:00:00.000000Z"), id="explicit-micros"),
        pytest.param(_body(occurred_at="2026-11-27T10:00:00+00:00"), id="offset-zero"),
        pytest.param(_body(text="hello", previous_price="180", extra="x"), id="other-fields"),
    ],
)
def test_spec_example_key(body: bytes) -> None:
    message = _parse(body)
    assert message.idempotency_key == SPEC_KEY


def test_key_is_lowercase_hex_sha256() -> None:
    key = _parse(_body()).idempotency_key
    assert len(key) == 64
    assert key == key.lower()
    int(key, 16)


@pytest.mark.parametrize(
    "changes",
    [
        {"ticker": "MSFT"},
        {"price": "189.11"},
        {"occurred_at": "2026-11-27T10:00:00.000001Z"},
        {"channel": "sms"},
        {"audience": "basic"},
    ],
)
def test_each_key_field_changes_the_key(changes: dict[str, Any]) -> None:
    assert _parse(_body(**changes)).idempotency_key != SPEC_KEY


@pytest.mark.parametrize(
    "changes",
    [{"text": "other text"}, {"previous_price": "1"}, {"unknown": 1}],
)
def test_non_key_fields_do_not_change_the_key(changes: dict[str, Any]) -> None:
    assert _parse(_body(**changes)).idempotency_key == SPEC_KEY


def test_unknown_fields_cannot_override_computed_keys() -> None:
    message = _parse(
        _body(idempotency_key="evil", topic_key="evil", price_text="1", occurred_at_text="t")
    )
    assert message.idempotency_key == SPEC_KEY
    assert message.topic_key == "AAPL|email|premium"
    assert message.provider_body()["idempotency_key"] == SPEC_KEY
    assert message.stored_payload()["idempotency_key"] == SPEC_KEY


# --- decimals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_raw("100"), id="number-100"),
        pytest.param(_raw("1E+2"), id="number-1E+2"),
        pytest.param(_raw("1e2"), id="number-1e2"),
        pytest.param(_raw("100.000"), id="number-100.000"),
        pytest.param(_body(price="100"), id="string-100"),
        pytest.param(_body(price="1E+2"), id="string-1E+2"),
        pytest.param(_body(price="100.000"), id="string-100.000"),
    ],
)
def test_hundred_normalises_to_100(body: bytes) -> None:
    message = _parse(body)
    assert message.price_text == "100"
    assert message.provider_body()["price"] == "100"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("189.10", "189.1"),
        ("100", "100"),
        ("1E+2", "100"),
        ("100.000", "100"),
        ("0.000100", "0.0001"),
        ("1.5E-7", "0.00000015"),
        ("12E+3", "12000"),
        ("123456789.123456789", "123456789.123456789"),
    ],
)
def test_normalise_decimal(value: str, expected: str) -> None:
    assert normalise_decimal(Decimal(value)) == expected


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_body(price="123456789.123456789"), id="string"),
        pytest.param(_raw("123456789.123456789"), id="number"),
    ],
)
def test_price_kept_exactly_not_through_float(body: bytes) -> None:
    message = _parse(body)
    assert message.price == Decimal("123456789.123456789")
    assert message.price_text == "123456789.123456789"
    assert message.provider_body()["price"] == "123456789.123456789"


@pytest.mark.parametrize(
    "digits",
    ["12345678901234567890", "1234567890.1234567891", "0.12345678901234567891"],
)
def test_twenty_digit_json_number_kept_exactly(digits: str) -> None:
    message = _parse(_raw(digits))
    assert message.price == Decimal(digits)
    assert message.price_text == digits


def test_previous_price_normalised_in_provider_body() -> None:
    message = _parse(_body(previous_price="180.500"))
    assert message.previous_price == Decimal("180.5")
    assert message.provider_body()["previous_price"] == "180.5"


def test_price_with_more_than_28_digits_kept_exactly() -> None:
    digits = "1234567890.12345678901234567890123"
    message = _parse(_body(price=digits))
    assert message.price_text == digits
    other = _parse(_body(price="1234567890.12345678901234567890124"))
    assert other.idempotency_key != message.idempotency_key


def test_huge_exponent_is_invalid_or_has_a_key() -> None:
    try:
        message = _parse(_body(price="1E+1000000"))
    except InvalidMessage:
        return
    assert len(message.idempotency_key) == 64


def test_tiny_price_is_invalid_or_not_normalised_to_zero() -> None:
    try:
        message = _parse(_body(price="1E-5000000"))
    except InvalidMessage:
        return
    assert message.price_text != "0"


# --- timestamps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2026, 11, 27, 10, tzinfo=UTC), "2026-11-27T10:00:00.000000Z"),
        (
            datetime(2026, 11, 27, 11, 0, 0, 123, tzinfo=timezone(timedelta(hours=1))),
            "2026-11-27T10:00:00.000123Z",
        ),
        (
            datetime(2026, 11, 27, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
            "2026-11-28T04:30:00.000000Z",
        ),
    ],
)
def test_format_timestamp(value: datetime, expected: str) -> None:
    assert format_timestamp(value) == expected


def test_occurred_at_keeps_its_instant() -> None:
    message = _parse(_body(occurred_at="2026-11-27T11:00:00+01:00"))
    assert message.occurred_at == NOW
    assert message.occurred_at_text == "2026-11-27T10:00:00.000000Z"


@pytest.mark.parametrize(
    "delta",
    [timedelta(minutes=4), timedelta(minutes=5), timedelta(hours=-30), timedelta(0)],
    ids=["4-min-ahead", "5-min-ahead", "30-h-old", "now"],
)
def test_occurred_at_accepted_up_to_5_minutes_ahead(delta: timedelta) -> None:
    when = NOW + delta
    message = _parse(_body(occurred_at=when.isoformat()))
    assert message.occurred_at == when


def test_occurred_at_6_minutes_ahead_is_invalid() -> None:
    when = NOW + timedelta(minutes=6)
    with pytest.raises(InvalidMessage, match="future"):
        _parse(_body(occurred_at=when.isoformat()))


def test_future_check_uses_the_instant_not_the_wall_clock_of_the_offset() -> None:
    # 10:04 UTC written in +01:00 is 11:04 local: still only 4 minutes ahead.
    _parse(_body(occurred_at="2026-11-27T11:04:00+01:00"))
    with pytest.raises(InvalidMessage):
        _parse(_body(occurred_at="2026-11-27T05:06:00-05:00"))


def test_rfc3339_lowercase_t_and_z_accepted() -> None:
    assert _parse(_body(occurred_at="2026-11-27t10:00:00z")).idempotency_key == SPEC_KEY


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-27T10:00Z",
        "20261127T100000Z",
        "2026-W48-5T10:00:00Z",
        "2026-11-27T11:00:00+01",
        "2026-11-27T11:00:00+0100",
        "2026-11-27T10:00:00,5Z",
    ],
)
def test_non_rfc3339_timestamps_rejected(value: str) -> None:
    with pytest.raises(InvalidMessage):
        _parse(_body(occurred_at=value))


# --- keys and payloads ------------------------------------------------------------------------


def test_topic_key() -> None:
    message = _parse(_body(ticker="BRK.B", channel="sms", audience="vip_clients-eu"))
    assert message.topic_key == "BRK.B|sms|vip_clients-eu"


def test_provider_body() -> None:
    message = _parse(
        _body(
            occurred_at="2026-11-27T11:00:00+01:00",
            previous_price=180,
            text="AAPL up",
            source="feed-7",
        )
    )
    assert message.provider_body() == {
        "idempotency_key": SPEC_KEY,
        "ticker": "AAPL",
        "price": "189.1",
        "previous_price": "180",
        "occurred_at": "2026-11-27T10:00:00.000000Z",
        "audience": "premium",
        "text": "AAPL up",
    }


def test_provider_body_optional_fields_absent() -> None:
    body = _parse(_body()).provider_body()
    assert body["previous_price"] is None
    assert body["text"] is None


def test_stored_payload_keeps_unknown_fields() -> None:
    message = _parse(_body(source="feed-7", meta={"venue": "XNAS", "seq": 42}, tags=["a", "b"]))
    payload = message.stored_payload()
    assert payload["source"] == "feed-7"
    assert payload["meta"] == {"venue": "XNAS", "seq": 42}
    assert payload["tags"] == ["a", "b"]
    assert payload["channel"] == "email"
    assert payload["idempotency_key"] == SPEC_KEY
    assert payload["price"] == "189.1"
    assert payload["occurred_at"] == "2026-11-27T10:00:00.000000Z"


def test_stored_payload_keeps_unknown_decimal_exactly() -> None:
    payload = _parse(_raw("0.1", field="volume")).stored_payload()
    assert payload["volume"] == Decimal("0.1")
    assert payload["price"] == "189.1"


# --- valid edges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"ticker": "A"}, id="ticker-1"),
        pytest.param({"ticker": "ABCDEFGHIJKLMNOP"}, id="ticker-16"),
        pytest.param({"ticker": "BRK.B"}, id="ticker-dot"),
        pytest.param({"ticker": "RDS-A"}, id="ticker-dash"),
        pytest.param({"ticker": "7203"}, id="ticker-digits"),
        pytest.param({"audience": "a"}, id="audience-1"),
        pytest.param({"audience": "a" * 64}, id="audience-64"),
        pytest.param({"audience": "tier_1-eu"}, id="audience-chars"),
        pytest.param({"channel": "sms"}, id="channel-sms"),
        pytest.param({"text": "x" * 1000}, id="text-1000"),
        pytest.param({"text": "é" * 1000}, id="text-1000-non-ascii"),
        pytest.param({"text": ""}, id="text-empty"),
        pytest.param({"text": None}, id="text-null"),
        pytest.param({"previous_price": None}, id="previous-null"),
        pytest.param({"previous_price": "0.0001"}, id="previous-small"),
        pytest.param({"price": "0.0000001"}, id="price-small"),
    ],
)
def test_valid_edges(changes: dict[str, Any]) -> None:
    _parse(_body(**changes))


# --- invalid ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_body(ticker="aapl"), id="ticker-lowercase"),
        pytest.param(_body(ticker="A" * 17), id="ticker-17"),
        pytest.param(_body(ticker=""), id="ticker-empty"),
        pytest.param(_body(ticker="AA PL"), id="ticker-space"),
        pytest.param(_body(ticker="AAPL/X"), id="ticker-slash"),
        pytest.param(_body(ticker="AAPL_X"), id="ticker-underscore"),
        pytest.param(_body(ticker="ÄAPL"), id="ticker-non-ascii"),
        pytest.param(_body(ticker="AAPL\n"), id="ticker-trailing-newline"),
        pytest.param(_body(ticker=123), id="ticker-number"),
        pytest.param(_body(ticker=_MISSING), id="ticker-missing"),
        pytest.param(_body(price="0"), id="price-0"),
        pytest.param(_raw("0"), id="price-number-0"),
        pytest.param(_body(price="0.000"), id="price-0.000"),
        pytest.param(_body(price="-1"), id="price-minus-1"),
        pytest.param(_raw("-1"), id="price-number-minus-1"),
        pytest.param(_body(price="NaN"), id="price-string-NaN"),
        pytest.param(_body(price="Infinity"), id="price-string-Infinity"),
        pytest.param(_body(price="inf"), id="price-string-inf"),
        pytest.param(_raw("NaN"), id="price-literal-NaN"),
        pytest.param(_raw("Infinity"), id="price-literal-Infinity"),
        pytest.param(_raw("-Infinity"), id="price-literal-minus-Infinity"),
        pytest.param(_body(price="abc"), id="price-garbage"),
        pytest.param(_body(price=""), id="price-empty"),
        pytest.param(_raw("true"), id="price-bool"),
        pytest.param(_raw("null"), id="price-null"),
        pytest.param(_raw("[1]"), id="price-array"),
        pytest.param(_body(price=_MISSING), id="price-missing"),
        pytest.param(_body(previous_price="0"), id="previous-0"),
        pytest.param(_body(previous_price=-5), id="previous-negative"),
        pytest.param(_body(previous_price="NaN"), id="previous-NaN"),
        pytest.param(_body(occurred_at="2026-11-27T10:00:00"), id="occurred-no-offset"),
        pytest.param(_body(occurred_at="2026-11-27"), id="occurred-date-only"),
        pytest.param(_body(occurred_at=1795773600), id="occurred-number"),
        pytest.param(_body(occurred_at="yesterday"), id="occurred-garbage"),
        pytest.param(_body(occurred_at="2026-13-27T10:00:00Z"), id="occurred-month-13"),
        pytest.param(_body(occurred_at=""), id="occurred-empty"),
        pytest.param(_body(occurred_at=None), id="occurred-null"),
        pytest.param(_body(occurred_at=_MISSING), id="occurred-missing"),
        pytest.param(_body(channel="push"), id="channel-push"),
        pytest.param(_body(channel="EMAIL"), id="channel-uppercase"),
        pytest.param(_body(channel=_MISSING), id="channel-missing"),
        pytest.param(_body(audience="Premium"), id="audience-uppercase"),
        pytest.param(_body(audience="a" * 65), id="audience-65"),
        pytest.param(_body(audience=""), id="audience-empty"),
        pytest.param(_body(audience="pre mium"), id="audience-space"),
        pytest.param(_body(audience="premium.eu"), id="audience-dot"),
        pytest.param(_body(audience="premium\n"), id="audience-trailing-newline"),
        pytest.param(_body(audience=_MISSING), id="audience-missing"),
        pytest.param(_body(text="x" * 1001), id="text-1001"),
        pytest.param(_body(text=5), id="text-number"),
        pytest.param(b'{"ticker": "\xff\xfe", "price": "1"}', id="not-utf8"),
        pytest.param(b"\xff\xfe\x00\x00", id="not-utf8-garbage"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"", id="empty-body"),
        pytest.param(b'{"ticker": "AAPL"', id="truncated-json"),
        pytest.param(b"[]", id="json-array"),
        pytest.param(json.dumps([BASE]).encode(), id="json-array-of-valid"),
        pytest.param(b'"hello"', id="json-string"),
        pytest.param(b"42", id="json-number"),
        pytest.param(b"null", id="json-null"),
        pytest.param(b"{}", id="json-empty-object"),
    ],
)
def test_invalid(body: bytes) -> None:
    with pytest.raises(InvalidMessage):
        _parse(body)


def test_invalid_message_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(InvalidMessage) as caught:
        _parse(_body(channel="push"))
    assert isinstance(caught.value, ValueError)
    assert "channel" in str(caught.value)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_non_utf8_encoded_json_is_invalid(encoding: str) -> None:
    with pytest.raises(InvalidMessage):
        _parse(json.dumps(BASE).encode(encoding))
