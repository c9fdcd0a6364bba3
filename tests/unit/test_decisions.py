"""The pure decisions of the pipeline: SPEC §1 (priority), §2 (answers), §7 (staleness)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.decisions import (
    ClaimAction,
    ClaimState,
    Verdict,
    classify,
    decide_claim,
    is_expired,
    is_stale,
    priority_for,
    retry_delay,
)
from worker.settings import parse_status_ranges

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
DEFAULT_RETRY = parse_status_ranges("408,425,429,500-599")


# --- classify ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.SENT),
        (201, Verdict.SENT),
        (202, Verdict.SENT),
        (204, Verdict.SENT),
        (299, Verdict.SENT),
        (409, Verdict.DUPLICATE),
        (429, Verdict.RETRY),
        (408, Verdict.RETRY),
        (425, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),
        (504, Verdict.RETRY),
        (599, Verdict.RETRY),
        (None, Verdict.RETRY),
        (400, Verdict.REJECTED),
        (401, Verdict.REJECTED),
        (403, Verdict.REJECTED),
        (404, Verdict.REJECTED),
        (410, Verdict.REJECTED),
        (413, Verdict.REJECTED),
        (422, Verdict.REJECTED),
        (451, Verdict.REJECTED),
        (302, Verdict.REJECTED),  # a redirect not followed is not an acceptance
    ],
)
def test_classify_with_spec_defaults(status: int | None, verdict: Verdict) -> None:
    assert classify(status, DEFAULT_RETRY) is verdict


def test_classify_403_when_configured_retryable() -> None:
    retry = parse_status_ranges("403,500-503")
    assert classify(403, retry) is Verdict.RETRY
    assert classify(503, retry) is Verdict.RETRY
    assert classify(504, retry) is Verdict.REJECTED
    assert classify(429, retry) is Verdict.REJECTED


def test_classify_timeout_retried_even_with_no_retry_statuses() -> None:
    assert classify(None, frozenset()) is Verdict.RETRY
    assert classify(503, frozenset()) is Verdict.REJECTED


def test_classify_success_and_duplicate_win_over_configuration() -> None:
    everything = frozenset(range(100, 600))
    assert classify(200, everything) is Verdict.SENT
    assert classify(409, everything) is Verdict.DUPLICATE


# --- priority ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "max_priority", "expected"),
    [
        (0, 10, 10),
        (1, 10, 9),
        (3, 10, 7),
        (9, 10, 1),
        (10, 10, 0),
        (11, 10, 0),
        (1000, 10, 0),
        (0, 255, 255),
        (2, 1, 0),
    ],
)
def test_priority_for(attempt: int, max_priority: int, expected: int) -> None:
    assert priority_for(attempt, max_priority) == expected


def test_priority_falls_with_attempts() -> None:
    priorities = [priority_for(attempt, 10) for attempt in range(15)]
    assert priorities == sorted(priorities, reverse=True)
    assert min(priorities) == 0


# --- expiry and staleness ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "expired"),
    [
        (timedelta(0), False),
        (timedelta(hours=23), False),
        (timedelta(days=1), False),
        (timedelta(days=1, microseconds=1), True),
        (timedelta(days=2), True),
        (-timedelta(minutes=4), False),
    ],
)
def test_is_expired(age: timedelta, expired: bool) -> None:
    assert is_expired(NOW - age, NOW, timedelta(days=1)) is expired


@pytest.mark.parametrize(
    ("occurred_at", "watermark", "stale"),
    [
        (NOW, None, False),
        (NOW, NOW, False),
        (NOW, NOW + SECOND, True),
        (NOW, NOW + timedelta(microseconds=1), True),
        (NOW + SECOND, NOW, False),
    ],
    ids=["no-watermark", "equal", "older", "older-by-1us", "newer"],
)
def test_is_stale(occurred_at: datetime, watermark: datetime | None, stale: bool) -> None:
    assert is_stale(occurred_at, watermark) is stale


def test_is_stale_compares_instants_across_offsets() -> None:
    same_instant = NOW.astimezone(timezone(timedelta(hours=1)))
    assert is_stale(same_instant, NOW) is False
    assert is_stale(same_instant - SECOND, NOW) is True


# --- retry delay ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "retry_after", "expected"),
    [
        (5.0, None, 5.0),
        (5.0, 120.0, 120.0),
        (300.0, 120.0, 300.0),
        (5.0, 0.0, 5.0),
        (0.0, 0.0, 0.0),
        (7.5, 7.5, 7.5),
    ],
)
def test_retry_delay(backoff: float, retry_after: float | None, expected: float) -> None:
    assert retry_delay(backoff, retry_after) == expected


# --- decide_claim -----------------------------------------------------------------------------


def _state(
    status: str = "pending",
    watermark: datetime | None = None,
    lease_until: datetime | None = None,
    lease_occurred_at: datetime | None = None,
) -> ClaimState:
    return ClaimState(
        delivery_status=status,
        attempts=0,
        watermark=watermark,
        lease_until=lease_until,
        lease_occurred_at=lease_occurred_at,
        now=NOW,
    )


@pytest.mark.parametrize("status", ["sent", "superseded", "dead"])
def test_decide_claim_finished(status: str) -> None:
    assert decide_claim(_state(status), NOW) is ClaimAction.FINISHED


@pytest.mark.parametrize("status", ["sent", "superseded", "dead"])
def test_decide_claim_finished_wins_over_stale_and_lease(status: str) -> None:
    state = _state(status, watermark=NOW + SECOND, lease_until=NOW + SECOND)
    assert decide_claim(state, NOW) is ClaimAction.FINISHED


def test_decide_claim_superseded() -> None:
    assert decide_claim(_state(watermark=NOW + SECOND), NOW) is ClaimAction.SUPERSEDED


def test_decide_claim_superseded_wins_over_a_held_lease() -> None:
    state = _state(watermark=NOW + SECOND, lease_until=NOW + 10 * SECOND)
    assert decide_claim(state, NOW) is ClaimAction.SUPERSEDED


def test_decide_claim_equal_watermark_is_not_stale() -> None:
    assert decide_claim(_state(watermark=NOW), NOW) is ClaimAction.CLAIM


def test_decide_claim_wait_while_lease_held() -> None:
    assert decide_claim(_state(lease_until=NOW + SECOND), NOW) is ClaimAction.WAIT
    state = _state(watermark=NOW - SECOND, lease_until=NOW + timedelta(microseconds=1))
    assert decide_claim(state, NOW) is ClaimAction.WAIT


@pytest.mark.parametrize(
    "lease_until",
    [NOW, NOW - SECOND, NOW - timedelta(days=1)],
    ids=["expires-now", "expired", "long-expired"],
)
def test_decide_claim_claims_expired_lease(lease_until: datetime) -> None:
    assert decide_claim(_state(lease_until=lease_until), NOW) is ClaimAction.CLAIM
    same_message = _state(lease_until=lease_until, lease_occurred_at=NOW)
    assert decide_claim(same_message, NOW) is ClaimAction.CLAIM
    older_message = _state(lease_until=lease_until, lease_occurred_at=NOW - SECOND)
    assert decide_claim(older_message, NOW) is ClaimAction.CLAIM


def test_decide_claim_expired_lease_of_a_newer_message_supersedes() -> None:
    # Its holder died mid-send: the newer message may have been delivered.
    state = _state(lease_until=NOW - SECOND, lease_occurred_at=NOW + SECOND)
    assert decide_claim(state, NOW) is ClaimAction.SUPERSEDED


def test_decide_claim_held_lease_of_a_newer_message_waits() -> None:
    # Still in flight: it may yet fail for good, so the older one waits rather than ends.
    state = _state(lease_until=NOW + SECOND, lease_occurred_at=NOW + SECOND)
    assert decide_claim(state, NOW) is ClaimAction.WAIT


def test_decide_claim_no_lease() -> None:
    assert decide_claim(_state(), NOW) is ClaimAction.CLAIM
    assert decide_claim(_state(watermark=NOW - SECOND), NOW) is ClaimAction.CLAIM


@pytest.mark.parametrize(
    ("backoff", "retry_after", "cap", "expected"),
    [
        (5.0, 2.4, 3600.0, 5.0),
        (5.0, 12.4, 3600.0, 12.4),  # exactly, not rounded
        (5.0, 10 * 365 * 86400.0, 3600.0, 3600.0),  # a provider's "in ten years" is capped
        (5.0, None, 3600.0, 5.0),
    ],
)
def test_retry_after_is_honoured_exactly_and_capped(
    backoff: float, retry_after: float | None, cap: float, expected: float
) -> None:
    assert retry_delay(backoff, retry_after, cap) == expected
