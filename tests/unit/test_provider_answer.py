"""SPEC §2: reading the provider's ``Retry-After`` and describing an answer."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.provider import ProviderAnswer, parse_retry_after

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)  # a Friday


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("120", 120.0, id="seconds"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param(" 120 ", 120.0, id="whitespace"),
        pytest.param("86400", 86400.0, id="a-day"),
        pytest.param("Fri, 27 Nov 2026 10:02:00 GMT", 120.0, id="http-date-future"),
        pytest.param("Fri, 27 Nov 2026 11:00:30 GMT", 3630.0, id="http-date-hour"),
        pytest.param("Fri, 27 Nov 2026 09:58:00 GMT", 0.0, id="http-date-past"),
        pytest.param("Fri, 27 Nov 2026 10:00:00 GMT", 0.0, id="http-date-now"),
        pytest.param("Fri, 27 Nov 2026 11:02:00 +0100", 120.0, id="date-with-offset"),
        pytest.param("Friday, 27-Nov-26 10:02:00 GMT", 120.0, id="rfc850-date"),
        pytest.param("Fri Nov 27 10:02:00 2026", 120.0, id="asctime-date"),
    ],
)
def test_parse_retry_after(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("soon", id="garbage"),
        pytest.param("-5", id="negative"),
        pytest.param("1.5", id="fraction"),
        pytest.param("12O", id="letter-o"),
        pytest.param("Fri, 32 Nov 2026 10:02:00 GMT", id="bad-date"),
    ],
)
def test_parse_retry_after_unreadable_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b3"])
def test_parse_retry_after_superscript_digits_are_unreadable(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_parse_retry_after_never_negative() -> None:
    for value in ["Thu, 01 Jan 1970 00:00:00 GMT", "Fri, 27 Nov 2026 09:59:59 GMT"]:
        assert parse_retry_after(value, NOW) == 0.0


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        pytest.param(ProviderAnswer(status=None), "no answer", id="no-answer"),
        pytest.param(ProviderAnswer(status=None, error="timeout"), "timeout", id="timeout"),
        pytest.param(
            ProviderAnswer(status=None, error="ClientConnectorError: refused"),
            "ClientConnectorError: refused",
            id="connection-error",
        ),
        pytest.param(ProviderAnswer(status=500), "HTTP 500", id="status-only"),
        pytest.param(
            ProviderAnswer(status=503, error="Service Unavailable"),
            "HTTP 503: Service Unavailable",
            id="status-and-error",
        ),
        pytest.param(
            ProviderAnswer(status=429, retry_after=30.0, error="slow down"),
            "HTTP 429: slow down",
            id="throttled",
        ),
        pytest.param(ProviderAnswer(status=201, message_id="m-1"), "HTTP 201", id="accepted"),
    ],
)
def test_describe(answer: ProviderAnswer, text: str) -> None:
    assert answer.describe() == text


def test_answer_defaults() -> None:
    answer = ProviderAnswer(status=200)
    assert answer.message_id is None
    assert answer.retry_after is None
    assert answer.error is None
