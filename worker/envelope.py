"""The envelope of a delivery: the headers the worker reads and sets (SPEC §1), and the
message it republishes for a retry or a deferral.

``x-attempt`` counts failed attempts (absent = 0): attempts are never counted with ``x-death``,
which brokers since 3.13 no longer let clients carry forward.

Headers are untrusted input. Our own (``x-attempt``, ``x-first-seen-at``, ``x-ignore-max-age``,
``x-replayed-from``) are honoured only on a message that came back to the work queue (a retry,
a deferral, a replay by ``worker-admin``), never on a fresh publish from the source exchange:
a publisher cannot make its message skip max age or start at attempt 2^31. Even then each is
bounded: an attempt within 0…``MAX_ATTEMPT``, a first-seen time between 2000 and now, a
dead-letter id a positive 63-bit int, ``x-ignore-max-age`` only beside ``x-replayed-from``.
The readers take any value an AMQP field table can hold and never raise.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from worker.decisions import priority_for
from worker.persistence import RawMessage
from worker.storable import storable_json

ATTEMPT = "x-attempt"
FIRST_SEEN_AT = "x-first-seen-at"
LAST_ERROR = "x-last-error"
# Set by `worker-admin replay`: the dead letter replayed, and (with --force) that the message
# is to be sent even though it is older than WORKER_MAX_AGE_SECONDS.
REPLAYED_FROM = "x-replayed-from"
IGNORE_MAX_AGE = "x-ignore-max-age"
# The publisher's message_id, kept when the worker republishes under an id of its own.
ORIGINAL_MESSAGE_ID = "x-original-message-id"
# Set on the parked message released as its open partition's probe: the probe's token.
PROBE = "x-probe"
# A retry's backoff ends then (RFC 3339), when it spends only the first part of it in the delay
# backend: back early, it is parked if its partition opened meanwhile, else delayed again.
NOT_BEFORE = "x-not-before"
SCHEDULED_AT = "x-scheduled-at"
# Set on a parked message released to the work queue: a replica whose view still shows its
# partition open reads the partition again before parking it once more.
RELEASED = "x-released"
# Headers the broker or the delay plugin add in transit, and those that belong to one delivery
# (a probe's token, a first hop's times): never carried forward.
_BROKER_HEADERS = frozenset({"x-death", "x-delay", PROBE, NOT_BEFORE, SCHEDULED_AT, RELEASED})
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")
# Headers only the worker and worker-admin set; dropped from a fresh publish's carried headers.
_CONTROL_HEADERS = frozenset({REPLAYED_FROM, IGNORE_MAX_AGE})
# WORKER_MAX_ATTEMPTS is at most 1000: a larger x-attempt is read as this (int4-safe).
MAX_ATTEMPT = 1000
_EARLIEST_FIRST_SEEN = datetime(2000, 1, 1, tzinfo=UTC)
_FUTURE_SKEW = timedelta(minutes=5)


def _as_int(value: object) -> int | None:
    """An integer header value (int, digits as text or bytes, an integral float); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:32]).decode("ascii", errors="replace")
    if isinstance(value, str):
        text = value.strip()
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 20):
            return None
        return sign * int(digits)
    if isinstance(value, (float, Decimal)):
        if not math.isfinite(value) or value != int(value):
            return None
        return int(value)
    return value if isinstance(value, int) else None


def read_attempt(headers: Mapping[str, Any]) -> int:
    """Failed attempts so far: 0 when absent, unreadable or negative, at most MAX_ATTEMPT."""
    value = _as_int(headers.get(ATTEMPT, 0))
    return 0 if value is None or value < 0 else min(value, MAX_ATTEMPT)


def read_first_seen(headers: Mapping[str, Any], now: datetime) -> datetime:
    """When the message was first seen; ``now`` when absent, unreadable or implausible."""
    value = headers.get(FIRST_SEEN_AT)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:64]).decode(errors="replace")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value[:64])
        except ValueError:
            return now
    elif isinstance(value, datetime):
        parsed = value
    else:
        return now
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    try:
        plausible = _EARLIEST_FIRST_SEEN <= parsed <= now + _FUTURE_SKEW
    except (OverflowError, TypeError):
        return now
    return parsed if plausible else now


def read_replayed_from(headers: Mapping[str, Any]) -> int | None:
    """The dead letter this message is a replay of, if a plausible id."""
    value = _as_int(headers.get(REPLAYED_FROM))
    return value if value is not None and 0 < value < 2**63 else None


def read_ignore_max_age(headers: Mapping[str, Any]) -> bool:
    """Set by ``worker-admin replay --force`` (as 1) on a replay only."""
    return read_replayed_from(headers) is not None and _as_int(headers.get(IGNORE_MAX_AGE)) == 1


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
    fresh: bool = False  # from the source exchange: our headers on it are not ours
    ignore_max_age: bool = False

    @classmethod
    def of(cls, incoming: AbstractIncomingMessage, *, fresh: bool = False) -> Delivery:
        """``fresh``: published by market data (not a retry, deferral or replay of ours)."""
        now = datetime.now(UTC)
        headers = incoming.headers or {}
        if fresh:
            return cls(incoming, 0, now, now, fresh=True)
        return cls(
            incoming,
            read_attempt(headers),
            read_first_seen(headers, now),
            now,
            ignore_max_age=read_ignore_max_age(headers),
        )

    def check_channel(self) -> None:
        """Raise ChannelInvalidStateError if the channel this came on is gone: the broker has
        requeued the message already, and a retry published now would be a second chain."""
        if channel_closed(self.incoming):
            raise ChannelInvalidStateError("the message's channel closed; the broker requeued it")

    def carried(self) -> dict[str, Any]:
        """The headers carried forward; a fresh publish's control headers are not."""
        headers = carried_headers(self.incoming.headers or {})
        if self.fresh:
            for name in _CONTROL_HEADERS:
                headers.pop(name, None)
        return headers

    def raw(self) -> RawMessage:
        """The delivery as a dead letter keeps it: exact body, headers made storable."""
        headers, sanitised = storable_json(self.carried())
        sanitised |= len(headers) != len(carried_headers(self.incoming.headers or {}))
        return RawMessage(
            body=self.incoming.body,
            content_type=self.incoming.content_type,
            routing_key=self.incoming.routing_key,
            headers=headers if isinstance(headers, dict) else {},
            first_seen_at=self.first_seen_at,
            redelivered=bool(self.incoming.redelivered),
            sanitised=("headers",) if sanitised else (),
            message_id=self.incoming.message_id,
            timestamp=self.incoming.timestamp,
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
        headers = self.carried()
        headers[ATTEMPT] = attempt
        headers[FIRST_SEEN_AT] = self.first_seen_at.isoformat()
        if last_error is not None:
            headers[LAST_ERROR] = last_error[:200]
        if incoming.message_id is not None and ORIGINAL_MESSAGE_ID not in headers:
            headers[ORIGINAL_MESSAGE_ID] = incoming.message_id
        if not_before is not None:
            headers[NOT_BEFORE] = not_before.isoformat()
            headers[SCHEDULED_AT] = datetime.now(UTC).isoformat()
        return aio_pika.Message(
            body=incoming.body,
            headers=headers,
            content_type=incoming.content_type,
            content_encoding=incoming.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            # Our own id, never the publisher's: aiormq matches a returned message to its
            # publish by message_id, and two publishes in flight with one id would confuse it.
            # The publisher's is kept in a header.
            message_id=uuid.uuid4().hex,
            correlation_id=incoming.correlation_id,
            timestamp=incoming.timestamp,
            type=incoming.type,
            app_id=incoming.app_id,
            priority=priority_for(attempt, max_priority),
        )


def channel_closed(incoming: AbstractIncomingMessage) -> bool:
    """The channel ``incoming`` came on is gone (the connection was replaced since)."""
    channel = getattr(incoming, "channel", None)
    return bool(getattr(channel, "is_closed", False))
