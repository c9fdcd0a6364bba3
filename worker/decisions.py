"""The pure decisions of the pipeline: no I/O, only values in and a verdict out.

- :func:`classify` maps a provider answer to what the worker does (SPEC §2);
- :func:`priority_for` is the work-queue priority of an attempt (SPEC §1);
- :func:`is_expired` and :func:`is_stale` end messages without sending them;
- :func:`decide_claim` reads the delivery and topic state and says whether to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class Verdict(StrEnum):
    SENT = "sent"
    DUPLICATE = "duplicate"
    RETRY = "retry"
    REJECTED = "rejected"


def classify(status: int | None, retry_statuses: frozenset[int]) -> Verdict:
    """``status`` None stands for a timeout or a connection error: always transient."""
    if status is None:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.SENT
    if status == 409:
        return Verdict.DUPLICATE
    if status in retry_statuses:
        return Verdict.RETRY
    return Verdict.REJECTED


def priority_for(attempt: int, max_priority: int) -> int:
    """New messages (attempt 0) get the top priority; each failure costs one level."""
    return max(max_priority - attempt, 0)


def is_expired(occurred_at: datetime, now: datetime, max_age: timedelta) -> bool:
    return now - occurred_at > max_age


def is_stale(occurred_at: datetime, watermark: datetime | None) -> bool:
    """Stale: a strictly newer message of the same topic key was already sent."""
    return watermark is not None and occurred_at < watermark


def retry_delay(
    backoff_seconds: float, retry_after: float | None, cap: float | None = None
) -> float:
    """A throttled answer is never retried before its ``Retry-After``, but a provider's
    ``Retry-After`` of a year waits no longer than ``cap`` (WORKER_BACKOFF_MAX_SECONDS)."""
    wait = backoff_seconds if retry_after is None else max(backoff_seconds, retry_after)
    return wait if cap is None else min(wait, max(cap, backoff_seconds))


class ClaimAction(StrEnum):
    FINISHED = "finished"  # the key is already sent, superseded or dead: nothing to do
    SUPERSEDED = "superseded"  # a newer message of the topic was sent: never send this one
    WAIT = "wait"  # another message of the topic is being sent right now
    CLAIM = "claim"  # take the topic lease and send


@dataclass(frozen=True, slots=True)
class ClaimState:
    """What the database says about a key and its topic at one instant."""

    delivery_status: str
    # failed attempts recorded for the key: the count a copy of another chain continues from
    attempts: int
    watermark: datetime | None  # occurred_at of the newest message sent (or maybe sent)
    lease_until: datetime | None
    lease_occurred_at: datetime | None  # occurred_at of the message the lease was taken for
    now: datetime


def decide_claim(state: ClaimState, occurred_at: datetime) -> ClaimAction:
    """Send only a pending key, never behind a newer message, never beside another send.

    A lease that expired unreleased means its holder crashed mid-send: its message may have
    reached the provider, so for ordering it counts as sent.
    """
    if state.delivery_status != "pending":
        return ClaimAction.FINISHED
    if is_stale(occurred_at, state.watermark):
        return ClaimAction.SUPERSEDED
    if state.lease_until is None:
        return ClaimAction.CLAIM
    if state.lease_until > state.now:
        return ClaimAction.WAIT
    if is_stale(occurred_at, state.lease_occurred_at):
        return ClaimAction.SUPERSEDED
    return ClaimAction.CLAIM
