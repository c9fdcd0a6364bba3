"""The envelope of a delivery: the headers the worker reads and sets (SPEC §1), and the
message it republishes for a retry or a deferral.

``x-attempt`` counts failed attempts (absent = 0): attempts are never counted with ``x-death``,
which brokers since 3.13 no longer let clients carry forward.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from worker.decisions import priority_for
from worker.persistence import RawMessage

ATTEMPT = "x-attempt"
FIRST_SEEN_AT = "x-first-seen-at"
LAST_ERROR = "x-last-error"
# Set by `worker-admin replay`: the dead letter replayed, and (with --force) that the message
# is to be sent even though it is older than WORKER_MAX_AGE_SECONDS.
REPLAYED_FROM = "x-replayed-from"
IGNORE_MAX_AGE = "x-ignore-max-age"
# Set on the parked message released as its open partition's probe: the probe's token.
PROBE = "x-probe"
# A retry's backoff ends then (RFC 3339), when it spends only the first part of it in the delay
# backend: back early, it is parked if its partition opened meanwhile, else delayed again.
NOT_BEFORE = "x-not-before"
SCHEDULED_AT = "x-scheduled-at"
# Headers the broker or the delay plugin add in transit, and a probe's token (it is one
# delivery's): never carried forward.
_BROKER_HEADERS = frozenset({"x-death", "x-delay", PROBE, NOT_BEFORE, SCHEDULED_AT})
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


def read_attempt(headers: Mapping[str, Any]) -> int:
    value = headers.get(ATTEMPT, 0)
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def read_first_seen(headers: Mapping[str, Any], now: datetime) -> datetime:
    value = headers.get(FIRST_SEEN_AT)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return now
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return now


def read_probe(headers: Mapping[str, Any]) -> uuid.UUID | None:
    value = headers.get(PROBE)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def read_not_before(
    headers: Mapping[str, Any], now: datetime, max_seconds: float
) -> tuple[datetime, datetime] | None:
    """(``x-scheduled-at``, ``x-not-before``): when a retry was scheduled and when its backoff
    ends, if both are times and the backoff ends within ``max_seconds`` (the cap) from now."""
    scheduled, due = _time(headers.get(SCHEDULED_AT)), _time(headers.get(NOT_BEFORE))
    if scheduled is None or due is None or (due - now).total_seconds() > max_seconds:
        return None
    return scheduled, due


def _time(value: object) -> datetime | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def carried_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The message's headers without what the broker added in transit."""
    return {
        k: v
        for k, v in headers.items()
        if k not in _BROKER_HEADERS and not k.startswith(_BROKER_HEADER_PREFIXES)
    }


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivered message with what the pipeline reads from its envelope."""

    incoming: AbstractIncomingMessage
    attempt: int
    first_seen_at: datetime
    received_at: datetime

    @classmethod
    def of(cls, incoming: AbstractIncomingMessage) -> Delivery:
        now = datetime.now(UTC)
        headers = incoming.headers or {}
        return cls(incoming, read_attempt(headers), read_first_seen(headers, now), now)

    def raw(self) -> RawMessage:
        return RawMessage(
            body=self.incoming.body,
            content_type=self.incoming.content_type,
            routing_key=self.incoming.routing_key,
            headers=carried_headers(self.incoming.headers or {}),
            first_seen_at=self.first_seen_at,
            redelivered=bool(self.incoming.redelivered),
        )

    def republish(
        self,
        attempt: int,
        last_error: str | None,
        max_priority: int,
        not_before: datetime | None = None,
    ) -> aio_pika.Message:
        """The same body and properties, our headers, the priority of ``attempt``."""
        incoming = self.incoming
        headers = carried_headers(incoming.headers or {})
        headers[ATTEMPT] = attempt
        headers[FIRST_SEEN_AT] = self.first_seen_at.isoformat()
        if last_error is not None:
            headers[LAST_ERROR] = last_error[:200]
        if not_before is not None:
            headers[NOT_BEFORE] = not_before.isoformat()
            headers[SCHEDULED_AT] = datetime.now(UTC).isoformat()
        return aio_pika.Message(
            body=incoming.body,
            headers=headers,
            content_type=incoming.content_type,
            content_encoding=incoming.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=incoming.message_id,
            correlation_id=incoming.correlation_id,
            timestamp=incoming.timestamp,
            type=incoming.type,
            app_id=incoming.app_id,
            priority=priority_for(attempt, max_priority),
        )
